"""The norms since 2020: response norms (FRN, GRN), EvoNorm B0/S0, PowerNorm, and the
statistics-free Dynamic Tanh / Dynamic erf. Thin modules over ``normlab.functional``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from .base import Norm


def _per_channel_param(layer: Norm, value: float, factory: dict[str, Any]) -> nn.Parameter:
    return nn.Parameter(torch.full((layer.num_features,), float(value), **factory))


def _scalar_param(value: float, factory: dict[str, Any]) -> nn.Parameter:
    return nn.Parameter(torch.full((1,), float(value), **factory))


class FilterResponseNorm(Norm):
    r"""Filter Response Normalization with TLU (Singh & Krishnan, CVPR 2020) (spec ``frn``).

    Per sample and channel over the positions: ``max(gamma * x / sqrt(mean(x^2) + |eps|) + beta, tau)``.
    ``tlu=False`` drops the threshold (no ``tau``); ``learned_eps=True`` adds the paper's
    learned scalar ``eps_learned`` (init ``learned_eps_init``) to eps, for 1x1 positions.
    No batch statistics: batch 1 trains. See :func:`normlab.functional.filter_response_norm`.
    """

    min_spatial = 1

    def __init__(self, num_features: int, eps: float = 1e-6, affine: bool = True, tlu: bool = True,
                 learned_eps: bool = False, learned_eps_init: float = 1e-4, channel_dim: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.tau = _per_channel_param(self, 0.0, factory) if tlu else None
        self.eps_learned = _scalar_param(learned_eps_init, factory) if learned_eps else None

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.filter_response_norm(x, self.weight, self.bias, self.tau, eps=self.eps,
                                      learned_eps=self.eps_learned, channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", tlu={self.tau is not None}, learned_eps={self.eps_learned is not None}"


class GlobalResponseNorm(Norm):
    r"""Global Response Normalization (Woo et al., CVPR 2023, ConvNeXt V2) (spec ``grn``).

    ``y = gamma * (x * N) + beta + x`` with N the per-(sample, channel) L2 norm over the
    positions divided by its channel mean. gamma and beta start at 0: the identity.
    See :func:`normlab.functional.global_response_norm`.
    """

    min_spatial = 1
    fuses_activation = True

    def __init__(self, num_features: int, eps: float = 1e-6, affine: bool = True, channel_dim: int = 1,
                 **kwargs: Any) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)
        if affine:
            with torch.no_grad():
                self.weight.zero_()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.global_response_norm(x, self.weight, self.bias, eps=self.eps, channel_dim=self.channel_dim,
                                      **self._act())


class EvoNormB0(Norm):
    r"""EvoNorm-B0 (Liu et al., NeurIPS 2020) (spec ``evob0``): batch variance and instance std.

    ``y = x / max(sqrt(var_batch + eps), v * x + sqrt(var_instance + eps)) * gamma + beta``;
    eval uses ``running_var`` (momentum 0.1, unbiased). State dict as timm's EvoNorm2dB0
    (``weight``, ``bias``, ``v``, ``running_var``). ``apply_act=False`` (no ``v``) is the
    official ``nonlinearity=False`` layer: ``gamma * x + beta`` alone.
    See :func:`normlab.functional.evonorm_b0`.
    """

    min_spatial = 1
    batch_stat_dims = "batch"

    def __init__(self, num_features: int, eps: float = 1e-3, momentum: float = 0.1, affine: bool = True,
                 apply_act: bool = True, channel_dim: int = 1, **kwargs: Any) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)
        if not isinstance(momentum, (int, float)) or not 0 <= momentum <= 1:
            raise ValueError(f"EvoNormB0: momentum must be a number in [0, 1], got {momentum!r}")
        self.momentum = momentum
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.v = _per_channel_param(self, 1.0, factory) if apply_act else None
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _uses_batch_stats(self) -> bool:
        return self.training

    def reset_running_stats(self) -> None:
        self.running_var.fill_(1)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.evonorm_b0(x, self.running_var, self.weight, self.bias, self.v, training=self.training,
                            momentum=self.momentum, eps=self.eps, channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", momentum={self.momentum}"


class EvoNormS0(Norm):
    r"""EvoNorm-S0 (Liu et al., NeurIPS 2020) (spec ``evos0:G``): per-sample, grouped.

    ``y = x * sigmoid(v * x) / sqrt(var_group + eps) * gamma + beta``, group variance as in
    group norm. Same in training and eval. ``apply_act=False`` (no ``v``): ``gamma * x + beta``
    alone, as timm's. See :func:`normlab.functional.evonorm_s0`.
    """

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True,
                 apply_act: bool = True, channel_dim: int = 1, **kwargs: Any) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)
        if not isinstance(num_groups, int) or num_groups <= 0 or num_features % num_groups:
            raise ValueError(f"EvoNormS0({num_features}): num_groups must be a positive divisor of the "
                             f"{num_features} channels, got {num_groups!r}")
        self.num_groups = num_groups
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.v = _per_channel_param(self, 1.0, factory) if apply_act else None

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.evonorm_s0(x, self.num_groups, self.weight, self.bias, self.v, eps=self.eps,
                            channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, " + super().extra_repr()


class PowerNorm(Norm):
    r"""PowerNorm (Shen et al., ICML 2020) (spec ``pn``): no centring, running quadratic mean.

    Buffers ``running_phi`` (psi^2, init 1) and ``ema_gz`` (the backward statistic nu,
    init 0), the official code's names; training divides by the statistic of earlier
    batches and backpropagates approximately (Algorithm 1). See
    :func:`normlab.functional.power_norm`.
    """

    fuses_activation = True

    def __init__(self, num_features: int, eps: float = 1e-5, alpha_fwd: float = 0.9, alpha_bkw: float = 0.9,
                 affine: bool = True, channel_dim: int = 1, **kwargs: Any) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)
        for name, a in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if not isinstance(a, (int, float)) or not 0 <= a <= 1:
                raise ValueError(f"PowerNorm: {name} must be a number in [0, 1], got {a!r}")
        self.alpha_fwd, self.alpha_bkw = float(alpha_fwd), float(alpha_bkw)
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.register_buffer("running_phi", torch.ones(num_features, **factory))
        self.register_buffer("ema_gz", torch.zeros(num_features, **factory))

    def reset_running_stats(self) -> None:
        self.running_phi.fill_(1)
        self.ema_gz.zero_()

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.power_norm(x, self.running_phi, self.ema_gz, self.weight, self.bias, training=self.training,
                            alpha_fwd=self.alpha_fwd, alpha_bkw=self.alpha_bkw, eps=self.eps,
                            channel_dim=self.channel_dim, **self._act())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}"


class _DynamicSquashNorm(Norm):
    """Shared shell of DyT and Derf: learned scalar ``alpha``, per-channel ``weight``/``bias``.

    ``eps`` is accepted (so ``convert`` can pass a layer norm's) and unused: there are no statistics.
    """

    def __init__(self, num_features: int, alpha_init: float = 0.5, eps: float = 1e-5, affine: bool = True,
                 channel_dim: int = 1, **kwargs: Any) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.alpha = _scalar_param(alpha_init, factory)

    def extra_repr(self) -> str:
        s = f"{self.num_features}, alpha={self.alpha.item():.4g}"
        s += f", affine={self.affine}"
        return s + (f", channel_dim={self.channel_dim}" if self.channel_dim != 1 else "")


class DynamicTanh(_DynamicSquashNorm):
    r"""Dynamic Tanh (Zhu et al., CVPR 2025) (spec ``dyt``): ``y = gamma * tanh(alpha * x) + beta``.

    ``alpha_init`` 0.5 is the paper's default (LLaMA: 0.2-0.8 for attention norms, smaller
    for FFN and final norms and for wider models). See :func:`normlab.functional.dynamic_tanh`.
    """

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.dynamic_tanh(x, self.alpha, self.weight, self.bias, channel_dim=self.channel_dim)


class DynamicErf(_DynamicSquashNorm):
    r"""Dynamic erf (Chen et al., 2025) (spec ``derf``): ``y = gamma * erf(alpha * x + s) + beta``.

    ``alpha`` (init 0.5) and the shift ``s`` (init ``shift_init`` = 0) are learned scalars.
    See :func:`normlab.functional.dynamic_erf`.
    """

    def __init__(self, num_features: int, alpha_init: float = 0.5, shift_init: float = 0.0, eps: float = 1e-5,
                 affine: bool = True, channel_dim: int = 1, **kwargs: Any) -> None:
        super().__init__(num_features, alpha_init, eps, affine, channel_dim, **kwargs)
        factory = {"device": kwargs.get("device"), "dtype": kwargs.get("dtype")}
        self.shift = _scalar_param(shift_init, factory)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.dynamic_erf(x, self.alpha, self.shift, self.weight, self.bias, channel_dim=self.channel_dim)
