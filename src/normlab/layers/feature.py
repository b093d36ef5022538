"""Per-sample layers: statistics of each sample alone, the same in training and eval."""

from __future__ import annotations

from typing import Callable

from torch import Tensor

from .. import functional as F
from ..functional.feature import channel_layer_norm_call, channel_rms_norm_call, per_sample_call
from .base import Norm, RunningStatsNorm


class LayerNorm(Norm):
    r"""Layer normalization (Ba et al. 2016), channel-first sense, per-channel affine.

    Per sample over every non-batch axis, C and all positions (the group-norm paper's
    convention; equals ``GroupNorm(C, num_groups=1)``). Works with batch size 1. For the
    transformer convention over the channel axis alone, use :class:`ChannelLayerNorm`
    (spec ``lnc``). See :func:`normlab.functional.layer_norm`.
    """

    fuses_activation = True

    def forward(self, x: Tensor) -> Tensor:
        y = self._cached_call(x)
        if y is not None:
            return y
        self.check_input(x)
        return F.layer_norm(x, self.weight, self.bias, eps=self.eps, channel_dim=self.channel_dim, **self._act())

    def _torch_call(self, x: Tensor, cd: int) -> Callable[[Norm, Tensor], Tensor] | None:
        f = per_sample_call("ln", x, 1, self.weight, self.bias, eps=self.eps, channel_dim=cd)  # type: ignore[arg-type]
        return self._affine_call(f)


class InstanceNorm(RunningStatsNorm):
    r"""Instance normalization (Ulyanov et al. 2016): per sample and channel, over positions.

    Needs at least one spatial axis. Unlike ``torch.nn.InstanceNorm2d`` the affine map is on
    by default (as in the paper's reference code); ``track_running_stats`` is off, so
    training and eval compute the same thing. See :func:`normlab.functional.instance_norm`.
    """

    fuses_activation = True

    min_spatial = 1
    batch_stat_dims = "spatial"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = False, channel_dim: int = 1, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_dim, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.instance_norm(
            x,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            use_input_stats=self._uses_batch_stats(),
            momentum=self._step_factor(),
            eps=self.eps,
            channel_dim=self.channel_dim,
            **self._act(),
        )


class GroupNorm(Norm):
    r"""Group normalization (Wu & He 2018): per sample, over groups of consecutive channels.

    ``num_groups`` (32 by default, the paper's choice) must divide ``num_features``.
    ``num_groups=1`` is :class:`LayerNorm`, ``num_groups=C`` is :class:`InstanceNorm`.
    See :func:`normlab.functional.group_norm`.
    """

    fuses_activation = True

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-5, affine: bool = True,
                 channel_dim: int = 1, **kwargs) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)
        if not isinstance(num_groups, int) or num_groups <= 0 or num_features % num_groups:
            raise ValueError(
                f"GroupNorm({num_features}): num_groups must be a positive divisor of the {num_features} channels, "
                f"got {num_groups!r}"
            )
        self.num_groups = num_groups

    def check_input(self, x: Tensor) -> int:
        cd = super().check_input(x)
        # torch's rule (F.group_norm): a batch holding one value per group in all raises, in
        # training and eval alike, rather than return the bias
        if x.numel() // self.num_groups == 1:
            raise ValueError(
                f"{self._describe()}: expected more than one value per group (as torch.nn.GroupNorm), "
                f"got input shape {tuple(x.shape)} with {self.num_groups} groups"
            )
        return cd

    def forward(self, x: Tensor) -> Tensor:
        y = self._cached_call(x)
        if y is not None:
            return y
        self.check_input(x)
        return F.group_norm(x, self.num_groups, self.weight, self.bias, eps=self.eps, channel_dim=self.channel_dim,
                            **self._act())

    def _torch_call(self, x: Tensor, cd: int) -> Callable[[Norm, Tensor], Tensor] | None:
        f = per_sample_call("gn", x, self.num_groups, self.weight, self.bias, eps=self.eps,  # type: ignore[arg-type]
                            channel_dim=cd)
        return self._affine_call(f)

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, " + super().extra_repr()


class RMSNorm(Norm):
    r"""RMS normalization (Zhang & Sennrich 2019) per sample over every non-batch axis.

    ``y = weight * x / sqrt(mean(x^2) + eps)``: no centring and no bias (``weight`` only,
    as ``torch.nn.RMSNorm``). ``eps=None`` means the input dtype's machine epsilon.
    """

    fuses_activation = True

    has_bias = False
    eps_none_ok = True

    def __init__(self, num_features: int, eps: float | None = 1e-6, affine: bool = True, channel_dim: int = 1,
                 **kwargs) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.rms_norm(x, self.weight, eps=self.eps, channel_dim=self.channel_dim, **self._act())


class ChannelLayerNorm(Norm):
    r"""Layer norm over the channel axis alone at each position (spec ``lnc``).

    The transformer / ConvNeXt convention: ``channel_dim=-1`` on ``(N, L, C)`` is
    ``torch.nn.LayerNorm(C)`` (same state_dict); ``channel_dim=1`` on ``(N, C, H, W)`` is
    ConvNeXt's "LayerNorm2d". See :func:`normlab.functional.channel_layer_norm`.
    """

    def forward(self, x: Tensor) -> Tensor:
        y = self._cached_call(x)
        if y is not None:
            return y
        self.check_input(x)
        return F.channel_layer_norm(x, self.weight, self.bias, eps=self.eps, channel_dim=self.channel_dim)

    def _torch_call(self, x: Tensor, cd: int) -> Callable[[Norm, Tensor], Tensor] | None:
        f = channel_layer_norm_call(x, self.weight, self.bias, eps=self.eps, channel_dim=cd)  # type: ignore[arg-type]
        return self._affine_call(f)


class ChannelRMSNorm(Norm):
    r"""RMS norm over the channel axis alone at each position (spec ``rmsc``).

    With ``channel_dim=-1`` this is ``torch.nn.RMSNorm(C)``, same state_dict (``weight``);
    ``eps=None`` means the input dtype's machine epsilon, as torch's default.
    """

    has_bias = False
    eps_none_ok = True

    def __init__(self, num_features: int, eps: float | None = 1e-6, affine: bool = True, channel_dim: int = 1,
                 **kwargs) -> None:
        super().__init__(num_features, eps, affine, channel_dim, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        y = self._cached_call(x)
        if y is not None:
            return y
        self.check_input(x)
        return F.channel_rms_norm(x, self.weight, eps=self.eps, channel_dim=self.channel_dim)

    def _torch_call(self, x: Tensor, cd: int) -> Callable[[Norm, Tensor], Tensor] | None:
        return self._affine_call(channel_rms_norm_call(x, self.weight, eps=self.eps, channel_dim=cd), bias=False)
