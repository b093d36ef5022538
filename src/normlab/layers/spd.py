"""Riemannian batch normalization of SPD matrices (Brooks et al., NeurIPS 2019), and the
SPDNet layers it is used between: BiMap, ReEig, LogEig (Huang & Van Gool, AAAI 2017)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import _moments
from ..functional import spd as FS

__all__ = ["SPDBatchNorm", "BiMap", "ReEig", "LogEig"]


class SPDBatchNorm(nn.Module):
    r"""Riemannian batch norm for batches of SPD matrices (Brooks et al., NeurIPS 2019,
    arXiv:1909.02414). See :func:`normlab.functional.spd_batch_norm`.

    Input ``(N, n, n)`` or ``(N, C, n, n)`` (all N*C matrices share one mean, as the
    reference torchspdnet ``BatchNormSPD`` pools them); output of the same shape, SPD.
    Training centres on the batch's Karcher mean (``karcher_steps`` steps of Karcher flow
    from the arithmetic mean, 1 as in the reference) and moves ``running_mean`` along the
    geodesic toward it by ``momentum`` (``None``: the inductive mean running #_{1/k} B_k,
    which ``normlab.recalibrate`` uses); eval centres on ``running_mean``.

    The learned bias G is SPD by construction: ``bias = expm(sym(bias_log))``. The matrix
    exponential maps the symmetric matrices one-to-one onto the SPD matrices, so every SPD
    bias is reachable, any optimizer keeps it SPD with no projection or retraction, and at
    the initial G = I (``bias_log = 0``) a plain gradient step on ``bias_log`` is exactly the
    paper's Riemannian SGD step G <- Exp_G(-lr G sym(dL/dG) G).

    Args:
        n: the matrix size.
        momentum: the geodesic step eta of the running mean (0.1 in the reference), or None.
        karcher_steps: Karcher-flow iterations for the batch mean.
        detach_mean: treat the batch mean as a constant in the backward pass (the
            reference code); False back-propagates through the Karcher flow.
        check_spd: validate that inputs are symmetric positive definite (a Cholesky per
            matrix); on by default.
    """

    def __init__(
        self,
        n: int,
        momentum: float | None = 0.1,
        karcher_steps: int = 1,
        detach_mean: bool = True,
        check_spd: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise ValueError(f"{name}: n must be a positive int, got {n!r}")
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"{name}: momentum must be in [0, 1] or None, got {momentum!r}")
        if not isinstance(karcher_steps, int) or karcher_steps < 1:
            raise ValueError(f"{name}: karcher_steps must be an int >= 1, got {karcher_steps!r}")
        self.n = n
        self.momentum = momentum
        self.karcher_steps = karcher_steps
        self.detach_mean = detach_mean
        self.check_spd = check_spd
        factory = {"device": device, "dtype": dtype}
        self.bias_log = nn.Parameter(torch.zeros(n, n, **factory))
        self.register_buffer("running_mean", torch.eye(n, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @property
    def bias(self) -> Tensor:
        """The SPD bias G = expm(sym(bias_log))."""
        return FS.expm_sym(self.bias_log)

    def reset_running_stats(self) -> None:
        with torch.no_grad():
            self.running_mean.copy_(torch.eye(self.n, dtype=self.running_mean.dtype, device=self.running_mean.device))
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        nn.init.zeros_(self.bias_log)

    def check_input(self, x: Tensor) -> None:
        who = f"{type(self).__name__}({self.n})"
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{who}: expected a floating-point input, got dtype {x.dtype}")
        if x.ndim not in (3, 4):
            raise ValueError(f"{who}: expected SPD matrices of shape (N, n, n) or (N, C, n, n), got shape {tuple(x.shape)}")
        if x.shape[-1] != x.shape[-2]:
            raise ValueError(f"{who}: expected square matrices in the last two axes, got shape {tuple(x.shape)}")
        if x.shape[-1] != self.n:
            raise ValueError(f"{who}: expected {self.n}x{self.n} matrices, got {x.shape[-2]}x{x.shape[-1]}")
        if x.numel() == 0:
            raise ValueError(f"{who}: got an empty batch, shape {tuple(x.shape)}")
        if not self.check_spd:
            return
        with torch.no_grad():
            flat = x.reshape(-1, self.n, self.n)
            if not torch.isfinite(flat).all():
                raise ValueError(f"{who}: input holds NaN or Inf values")
            asym = (flat - flat.transpose(-1, -2)).abs().amax(dim=(-1, -2))
            size = flat.abs().amax(dim=(-1, -2))
            tol = torch.finfo(x.dtype).eps ** 0.5
            bad = (asym > tol * size).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(
                    f"{who}: expected symmetric matrices, but {bad.numel()} of {flat.shape[0]} are not "
                    f"(first: matrix {i} of the flattened batch, max |P - P^T| = {float(asym[i]):.3g})"
                )
            info = torch.linalg.cholesky_ex(flat).info
            bad = (info != 0).nonzero()
            if bad.numel():
                i = int(bad[0])
                raise ValueError(
                    f"{who}: expected positive-definite matrices, but {bad.numel()} of {flat.shape[0]} are not "
                    f"(first: matrix {i} of the flattened batch; its smallest eigenvalue is "
                    f"{float(torch.linalg.eigvalsh(flat[i]).min()):.3g})"
                )

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        factor = None
        if self.training:
            self.num_batches_tracked.add_(1)
            factor = _moments.running_factor(self.momentum, self.num_batches_tracked)
        return FS.spd_batch_norm(
            x,
            self.running_mean,
            self.bias,
            training=self.training,
            momentum=factor,
            karcher_steps=self.karcher_steps,
            detach_mean=self.detach_mean,
        )

    def extra_repr(self) -> str:
        return (f"{self.n}, momentum={self.momentum}, karcher_steps={self.karcher_steps}, "
                f"detach_mean={self.detach_mean}")


def _check_square(who: str, x: Tensor, n: int | None = None) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point torch.Tensor, got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.ndim < 2 or x.shape[-1] != x.shape[-2] or (n is not None and x.shape[-1] != n):
        want = f"{n}x{n}" if n is not None else "square"
        raise ValueError(f"{who}: expected {want} matrices in the last two axes, got shape {tuple(x.shape)}")


class BiMap(nn.Module):
    r"""BiMap layer of SPDNet (Huang & Van Gool, AAAI 2017, arXiv:1608.04233):
    Y = W^T X W, mapping n_in x n_in SPD matrices to n_out x n_out SPD matrices
    (n_out <= n_in). See :func:`normlab.functional.bimap`.

    W is kept semi-orthogonal (W^T W = I, a point of the Stiefel manifold, as in the paper)
    by ``torch.nn.utils.parametrizations.orthogonal``, so any optimizer keeps the output SPD
    without a retraction step. Input (..., n_in, n_in), output (..., n_out, n_out).
    """

    def __init__(self, n_in: int, n_out: int, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for arg, v in (("n_in", n_in), ("n_out", n_out)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"BiMap: {arg} must be a positive int, got {v!r}")
        if n_out > n_in:
            raise ValueError(f"BiMap: n_out must be <= n_in (a full-rank W^T X W), got {n_in} -> {n_out}")
        self.n_in, self.n_out = n_in, n_out
        self.weight = nn.Parameter(torch.empty(n_in, n_out, device=device, dtype=dtype))
        nn.init.orthogonal_(self.weight)
        nn.utils.parametrizations.orthogonal(self, "weight")

    def forward(self, x: Tensor) -> Tensor:
        _check_square(f"BiMap({self.n_in}, {self.n_out})", x, self.n_in)
        return FS.bimap(x, self.weight)

    def extra_repr(self) -> str:
        return f"{self.n_in}, {self.n_out}"


class ReEig(nn.Module):
    r"""ReEig layer of SPDNet: U max(S, eps) U^T (eigenvalues clamped below at ``eps``).
    See :func:`normlab.functional.re_eig`."""

    def __init__(self, eps: float = 1e-4) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"ReEig: eps must be > 0, got {eps!r}")
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        _check_square("ReEig", x)
        return FS.re_eig(x, self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps}"


class LogEig(nn.Module):
    r"""LogEig layer of SPDNet: the matrix logarithm U log(S) U^T of SPD matrices.
    See :func:`normlab.functional.log_eig`."""

    def forward(self, x: Tensor) -> Tensor:
        _check_square("LogEig", x)
        return FS.log_eig(x)
