"""A normalization layer followed by its activation, as one layer: ``make_norm("bn", C,
act="relu")``. The activation is a child module ``act`` of the norm (no parameters, so the
state_dict is the norm's own, as timm's ``BatchNormAct2d``) applied to the norm's output;
``inplace_abn=True`` gives in-place activated batch norm, which keeps only its output."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F
from ..functional.norm_act import ACTIVATIONS, activation
from .base import Norm
from .batch import BatchNorm

__all__ = ["Activation", "InPlaceABN", "with_activation", "fusable_activation"]


class Activation(nn.Module):
    """One of :data:`normlab.functional.norm_act.ACTIVATIONS` by name (leaky_relu's slope kept)."""

    def __init__(self, name: str, negative_slope: float = 0.01) -> None:
        super().__init__()
        if name not in ACTIVATIONS:
            raise ValueError(f"unknown activation {name!r}; known: {', '.join(ACTIVATIONS)}")
        self.name, self.negative_slope = name, negative_slope

    def forward(self, x: Tensor) -> Tensor:
        return activation(x, self.name, self.negative_slope)

    def extra_repr(self) -> str:
        return self.name + (f", negative_slope={self.negative_slope}" if self.name == "leaky_relu" else "")


def _apply_act(module: nn.Module, args: Any, out: Tensor) -> Tensor:
    """Forward hook: the norm's output through its ``act`` child."""
    return module.act(out)


class InPlaceABN(BatchNorm):
    r"""In-place activated batch norm (Rota Bulo et al., CVPR 2018): batch norm + leaky ReLU
    that keeps only its output for backward (half the activation memory of the two layers).

    The scale is ``|weight| + abn_eps`` so the affine map can be inverted; equal to
    ``leaky_relu(BatchNorm(x))`` for positive weights, up to ``abn_eps``. State dict as
    :class:`BatchNorm`. See :func:`normlab.functional.batch_norm_leaky_relu_inplace`.
    """

    def __init__(self, num_features: int, negative_slope: float = 0.01, abn_eps: float = 1e-5, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        if not self.affine:
            raise ValueError(f"InPlaceABN({num_features}): needs affine=True (its backward inverts the affine map)")
        if self.process_group is not None:
            raise ValueError(f"InPlaceABN({num_features}): synchronized statistics are not supported")
        if not negative_slope > 0:
            raise ValueError(f"InPlaceABN({num_features}): negative_slope must be > 0 (invertible), "
                             f"got {negative_slope!r}")
        self.negative_slope, self.abn_eps = negative_slope, abn_eps

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        call = self._batch_call()
        return F.batch_norm_leaky_relu_inplace(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=call["training"],
            momentum=call["momentum"], eps=self.eps, negative_slope=self.negative_slope, abn_eps=self.abn_eps,
            channel_dim=self.channel_dim)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", act=leaky_relu, negative_slope={self.negative_slope}"


def with_activation(norm: nn.Module, act: str | None, negative_slope: float = 0.01,
                    inplace_abn: bool = False) -> nn.Module:
    """``norm`` followed by ``act`` (relu, leaky_relu, silu, gelu), as one layer.

    The one place that decides how a norm gets its activation (``make_norm(..., act=...)``
    calls it). ``inplace_abn=True`` (batch norm with leaky_relu only) returns an
    :class:`InPlaceABN` with the norm's settings and state.
    """
    if act is None:
        raise ValueError("with_activation: act is required (relu, leaky_relu, silu or gelu)")
    if not isinstance(norm, Norm):
        raise ValueError(f"with_activation: {type(norm).__name__} is not a normlab norm layer; "
                         f"an activation can only be fused into one")
    if act not in ACTIVATIONS:
        raise ValueError(f"{norm._describe()}: unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")
    if inplace_abn:
        if type(norm) is not BatchNorm or act != "leaky_relu":
            raise ValueError(f"{norm._describe()}: inplace_abn needs batch norm ('bn') with act='leaky_relu' "
                             f"(an invertible activation), got {type(norm).__name__} with {act!r}")
        new = InPlaceABN(norm.num_features, negative_slope=negative_slope, eps=norm.eps, momentum=norm.momentum,
                         track_running_stats=norm.track_running_stats, channel_dim=norm.channel_dim,
                         affine=norm.affine)
        ref = norm.weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(norm.state_dict())
        return new
    return _attach(norm, Activation(act, negative_slope))


def _attach(norm: nn.Module, act: nn.Module) -> nn.Module:
    if hasattr(norm, "act"):
        raise ValueError(f"{type(norm).__name__}: already has an activation ({norm.act!r})")
    norm.act = act
    if not getattr(norm, "fuses_activation", False):  # (else its function applies it: see Norm._act)
        norm.register_forward_hook(_apply_act)
    return norm


def fusable_activation(act: nn.Module) -> tuple[str, float] | None:
    """(name, negative_slope) of an activation module normlab fuses (torch's, timm's exact
    GELU, normlab's own :class:`Activation`), else None."""
    if isinstance(act, Activation):
        return act.name, act.negative_slope
    if type(act) is nn.ReLU:
        return "relu", 0.01
    if type(act) is nn.LeakyReLU:
        return "leaky_relu", act.negative_slope
    if type(act) is nn.SiLU:
        return "silu", 0.01
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu", 0.01
    if type(act).__name__ == "GELU" and not hasattr(act, "approximate"):  # timm's GELU: exact F.gelu
        return "gelu", 0.01
    return None
