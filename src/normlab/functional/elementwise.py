"""Normalization-free replacements for layer norm in transformers: Dynamic Tanh and Dynamic
erf. No statistics at all, an element-wise squashing with a learned input scale, then the
per-channel affine map.

Each is one autograd node that saves only its input: the forward is ``f(alpha * x + s)``
then the affine map, the backward recomputes ``f`` and ``f'`` from the saved input. This
keeps one input-sized tensor alive for backward instead of the three or four a chain of
torch operations keeps.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .._layout import channel_axis, per_channel

__all__ = ["dynamic_tanh", "dynamic_erf"]

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _squash(kind: str, z: Tensor) -> tuple[Tensor, Tensor]:
    """``f(z)`` and ``f'(z)`` for f = tanh or erf."""
    if kind == "tanh":
        t = torch.tanh(z)
        return t, torch.addcmul(torch.ones_like(t), t, t, value=-1.0)  # 1 - tanh^2
    t = torch.erf(z)
    return t, torch.exp(-(z * z)).mul_(_TWO_OVER_SQRT_PI)


def _other_axes_sum(t: Tensor, cd: int) -> Tensor:
    """Sum over every axis but the channel axis ``cd``: a length-C vector."""
    if cd == t.ndim - 1:
        return t.reshape(-1, t.shape[-1]).sum(0)
    return t.sum([d for d in range(t.ndim) if d != cd])


class _DynamicSquash(torch.autograd.Function):
    """``y = weight * f(alpha * x + shift) + bias`` with a backward that needs only ``x``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None,
                bias: Tensor | None, kind: str, channel_dim: int) -> Tensor:
        cd = channel_axis(x.ndim, channel_dim)
        z = torch.addcmul(shift, x, alpha) if shift is not None else x * alpha
        y = torch.tanh_(z) if kind == "tanh" else torch.erf_(z)
        if weight is not None and bias is not None:
            y = torch.addcmul(per_channel(bias, x.ndim, cd), y, per_channel(weight, x.ndim, cd))
        elif weight is not None:
            y = y.mul_(per_channel(weight, x.ndim, cd))
        elif bias is not None:
            y = y.add_(per_channel(bias, x.ndim, cd))
        ctx.save_for_backward(x, alpha, shift, weight)
        ctx.kind, ctx.cd, ctx.has_bias = kind, cd, bias is not None
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, alpha, shift, weight = ctx.saved_tensors
        cd = ctx.cd
        need_x, need_a, need_s, need_w, need_b = ctx.needs_input_grad[:5]
        z = torch.addcmul(shift, x, alpha) if shift is not None else x * alpha
        t, d = _squash(ctx.kind, z)
        g = dy * per_channel(weight, x.ndim, cd) if weight is not None else dy
        gd = g.mul_(d) if g is not dy else g * d  # dL/dz
        dx = gd * alpha if need_x else None
        da = (gd * x).sum().reshape(alpha.shape) if need_a else None
        ds = gd.sum().reshape(shift.shape) if need_s else None
        dw = _other_axes_sum(dy * t, cd) if need_w else None
        db = _other_axes_sum(dy, cd) if (need_b and ctx.has_bias) else None
        return dx, da, ds, dw, db, None, None


def _check_scalar(name: str, who: str, t: Tensor | None) -> None:
    if t is not None and t.numel() != 1:
        raise ValueError(f"{who}: {name} must be a tensor with one element (a learned scalar), got shape {tuple(t.shape)}")


def dynamic_tanh(
    x: Tensor, alpha: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, channel_dim: int = -1
) -> Tensor:
    r"""Dynamic Tanh (Zhu, Chen, He, LeCun & Liu, CVPR 2025, arXiv:2503.10622).

    A drop-in for layer norm in transformers, element-wise, with no statistics::

        y = gamma_c * tanh(alpha * x) + beta_c

    ``alpha`` is one learned scalar per layer (shape (1,); init 0.5 in the paper, smaller
    for wide language models), gamma and beta per channel (init 1 and 0).
    """
    _check_scalar("alpha", "dynamic_tanh", alpha)
    return _DynamicSquash.apply(x, alpha.to(x.dtype), None, weight, bias, "tanh", channel_dim)


def dynamic_erf(
    x: Tensor,
    alpha: Tensor,
    shift: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    channel_dim: int = -1,
) -> Tensor:
    r"""Dynamic erf, "Derf" (Chen, Lu, Zhu, Sun & Liu, 2025, arXiv:2512.10938).

    As Dynamic Tanh with the error function and a learned shift inside it::

        y = gamma_c * erf(alpha * x + s) + beta_c

    ``alpha`` and ``s`` are learned scalars (shape (1,); init 0.5 and 0 in the official
    code), gamma and beta per channel (init 1 and 0). ``shift=None`` means s = 0.
    """
    _check_scalar("alpha", "dynamic_erf", alpha)
    _check_scalar("shift", "dynamic_erf", shift)
    return _DynamicSquash.apply(x, alpha.to(x.dtype), None if shift is None else shift.to(x.dtype), weight, bias,
                                "erf", channel_dim)
