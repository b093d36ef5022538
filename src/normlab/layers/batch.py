"""Batch-statistic layers: normalize with moments over the batch, per channel."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .. import functional as F
from ..functional.batch import batch_norm_call
from .base import BatchStatNorm


class BatchNorm(BatchStatNorm):
    fuses_activation = True
    r"""Batch normalization (Ioffe & Szegedy 2015) for ``(N, C, *)`` input of any rank.

    ``y = weight * (x - E[x]) / sqrt(Var[x] + eps) + bias`` with moments per channel over
    the batch and every position; see :func:`normlab.functional.batch_norm`. One class
    serves torch's ``BatchNorm1d/2d/3d`` cases, with the same state_dict keys
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so a
    torch state_dict loads and gives the same eval output.

    Shape: ``(N, C, *)``, or any layout with ``channel_dim``; output has the input's shape
    and memory format. Eval uses the running statistics (unless
    ``track_running_stats=False``). ``process_group`` synchronizes the batch statistics
    across processes (see ``normlab.convert_sync``).
    """

    def forward(self, x: Tensor) -> Tensor:
        y = self._cached_call(x)
        if y is not None:
            return y
        self.check_input(x)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, **self._batch_call(),
                            **self._act())

    def _torch_call(self, x: Tensor, cd: int) -> Callable[[BatchNorm, Tensor], Tensor] | None:
        f = batch_norm_call(x, self.running_mean, self.running_var, self.weight, self.bias,
                            **self._batch_call(count=False))
        if f is None or not self._reads("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            return None
        count = self._counts_steps()

        def call(layer: BatchNorm, x: Tensor) -> Tensor:
            p, b = layer._parameters, layer._buffers
            if count:
                b["num_batches_tracked"].add_(1)  # type: ignore[union-attr]
            return f(x, b["running_mean"], b["running_var"], p["weight"], p.get("bias"))

        return call


class MeanOnlyBatchNorm(BatchStatNorm):
    r"""Mean-only batch normalization (Salimans & Kingma 2016), usually after weight norm.

    ``y = x - E[x] + bias``: the per-channel batch mean (over the batch and every position)
    is subtracted and a learned ``bias`` added; there is no division and no ``weight``.
    See :func:`normlab.functional.mean_only_batch_norm`. Eval subtracts ``running_mean``
    (momentum 0.1, the official code's ``0.9 * avg + 0.1 * mu``). State-dict keys:
    ``bias``, ``running_mean``, ``num_batches_tracked`` (no running variance is kept).
    ``eps`` is accepted, so ``normlab.convert`` can pass it, and unused.
    """

    fuses_activation = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, channel_dim: int = 1, process_group=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_dim, process_group,
                         **kwargs)
        self.weight = None  # the paper's layer learns a bias only
        self.running_var = None  # and normalizes with the mean alone

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()  # type: ignore[union-attr]
            self.num_batches_tracked.zero_()  # type: ignore[union-attr]

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        call = self._batch_call()
        del call["eps"]  # no division, so no eps
        return F.mean_only_batch_norm(x, self.running_mean, self.bias, **call, **self._act())


class BatchRenorm(BatchStatNorm):
    r"""Batch renormalization (Ioffe 2017): batch norm corrected toward the running statistics.

    In training ``y = weight * ((x - mu_B) / sigma_B * r + d) + bias`` with
    ``r = clip(sigma_B / sigma, 1/r_max, r_max)`` and ``d = clip((mu_B - mu) / sigma,
    -d_max, d_max)`` treated as constants in backward; in eval ``y = weight * (x - mu) /
    sigma + bias``. See :func:`normlab.functional.batch_renorm`.

    The running statistics are the paper's: ``mu`` and the standard deviation ``sigma``
    (not the variance) are averaged with ``momentum`` (0.01 by default: the paper used a
    "relatively fast" update rate; TF's ``renorm_momentum=0.99`` is the same 0.01). The buffers keep torch's names:
    ``running_var`` holds ``sigma^2 - eps`` so that eval is batch norm's expression
    ``(x - running_mean) / sqrt(running_var + eps)``; a torch ``BatchNorm`` state_dict
    loads and evaluates the same.

    Schedule (driven by ``num_batches_tracked``): plain batch norm (``r_max = 1``,
    ``d_max = 0``) for ``warmup_steps`` training steps, then both limits relaxed linearly to
    ``r_max`` and ``d_max`` over ``ramp_steps`` steps (an ``(r_steps, d_steps)`` pair gives
    separate ramps; the paper used 5000 and (35000, 20000)). With both 0 the final limits
    apply from the first step. ``reset_running_stats`` (and so ``normlab.recalibrate``)
    restarts the schedule too. Needs running statistics (``track_running_stats=True``).
    """

    fuses_activation = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.01, r_max: float = 3.0,
                 d_max: float = 5.0, warmup_steps: int = 5000, ramp_steps: int | tuple[int, int] = 20000,
                 affine: bool = True, track_running_stats: bool = True, channel_dim: int = 1, process_group=None,
                 **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_dim, process_group,
                         **kwargs)
        who = f"BatchRenorm({num_features})"
        if not track_running_stats:
            raise ValueError(f"{who}: needs running statistics (r and d are measured against them); "
                             f"got track_running_stats=False")
        if not r_max >= 1:
            raise ValueError(f"{who}: r_max must be >= 1, got {r_max!r}")
        if not d_max >= 0:
            raise ValueError(f"{who}: d_max must be >= 0, got {d_max!r}")
        ramps = ramp_steps if isinstance(ramp_steps, tuple) else (ramp_steps,)
        for name, v in [("warmup_steps", warmup_steps)] + [("ramp_steps", r) for r in ramps]:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{who}: {name} must be a non-negative int (or a pair for ramp_steps), got {v!r}")
        if len(ramps) not in (1, 2):
            raise ValueError(f"{who}: ramp_steps must be an int or an (r_steps, d_steps) pair, got {ramp_steps!r}")
        self.r_max, self.d_max = float(r_max), float(d_max)
        self.warmup_steps, self.ramp_steps = warmup_steps, ramp_steps

    def limits(self) -> tuple[Tensor, Tensor]:
        """``(r_max, d_max)`` in force for the next training step (0-dim tensors)."""
        return F.batch_renorm_limits(self.num_batches_tracked, self.r_max, self.d_max,  # type: ignore[arg-type]
                                     self.warmup_steps, self.ramp_steps)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        r_max, d_max = self.limits()  # before _step_factor counts this step
        return F.batch_renorm(x, self.running_mean, self.running_var, self.weight, self.bias,  # type: ignore[arg-type]
                              r_max=r_max, d_max=d_max, **self._batch_call(), **self._act())

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", r_max={self.r_max}, d_max={self.d_max}, "
                f"warmup_steps={self.warmup_steps}, ramp_steps={self.ramp_steps}")
