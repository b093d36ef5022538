"""Normalization-free replacements for layer norm in transformers: Dynamic Tanh and Dynamic
erf. No statistics at all, an element-wise squashing with a learned input scale, then the
per-channel affine map.

Each is one autograd node that saves only its input; the backward recomputes ``f`` and
``f'`` from it. This keeps one input-sized tensor alive for backward instead of the three a
chain of torch operations keeps. On CPU, with normlab's compiled kernels, the forward is one
pass (read x, write y) and the backward one (read dy and x, write dx, summing the
parameters' gradients on the way), for an input contiguous with the channel axis last or
channel-first (any float type; half precision read and written in its type, computed in
float32). Elsewhere (other devices, other layouts, ``fast_path(False)``, a backward with
``create_graph=True``) the torch operations below run: the reference the kernels are tested
against.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import _kernels
from .._kernels import elementwise as _ew
from .._layout import channel_axis, per_channel
from ..engine.routing import dy_view, kernel_views, route

__all__ = ["dynamic_tanh", "dynamic_erf"]

_TWO_OVER_SQRT_PI = 2.0 / math.sqrt(math.pi)


def _other_axes_sum(t: Tensor, cd: int) -> Tensor:
    """Sum over every axis but the channel axis ``cd``: a length-C vector."""
    if cd == t.ndim - 1:
        return t.reshape(-1, t.shape[-1]).sum(0)
    return t.sum([d for d in range(t.ndim) if d != cd])


class _DynamicSquash(torch.autograd.Function):
    """``y = weight * f(alpha * x + shift) + bias`` with a backward that needs only ``x``.

    On the compiled kernels where :func:`_kernel_layout` says so (see the module's docstring),
    else on torch operations, where tanh is computed as ``2 * sigmoid(2z) - 1``, the same
    function (in float32 within 1.8e-7 absolute of tanh, torch.tanh's own error being 6e-8):
    torch's CPU sigmoid is vectorized, its tanh about ten times slower.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None,
                bias: Tensor | None, kind: str, channel_dim: int) -> Tensor:
        cd = channel_axis(x.ndim, channel_dim)
        ctx.save_for_backward(x, alpha, shift, weight)
        ctx.kind, ctx.cd, ctx.has_bias = kind, cd, bias is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.layout = _kernel_layout(x, cd)
        if ctx.layout is not None:
            y, layout = torch.empty_like(x), ctx.layout
            _ew.squash_forward(_view(x, x, cd, layout), _view(y, x, cd, layout), layout, kind, alpha.item(),
                               0.0 if shift is None else shift.item(), weight, bias)
            return y
        w, b = _affine_vectors(x, weight, bias, cd)
        # one new tensor, then in place (a fresh large tensor costs more than a pass over it)
        if kind == "tanh":  # w * tanh(z) + b = 2w * sigmoid(2z) + (b - w)
            y = torch.sigmoid_(x * (2 * alpha)).mul_(2 * w).add_(b - w)
        else:
            z = torch.addcmul(shift, x, alpha) if shift is not None else x * alpha
            y = torch.erf_(z).mul_(w).add_(b)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if torch.is_grad_enabled():  # create_graph=True
            return _differentiable_backward(ctx, dy)
        if ctx.layout is not None:
            return _kernel_backward(ctx, dy)
        x, alpha, shift, weight = ctx.saved_tensors
        cd = ctx.cd
        need_x, need_a, need_s, need_w, need_b = ctx.needs_input_grad[:5]
        w, _ = _affine_vectors(x, weight, None, cd)
        db = _other_axes_sum(dy, cd) if need_w or (need_b and ctx.has_bias) else None
        # two new tensors: f(z) (then dy * f(z)) and f'(z) (then dL/dz, then dx)
        if ctx.kind == "tanh":  # tanh(z) = 2s - 1, tanh'(z) = 4 s (1 - s), s = sigmoid(2z)
            s = torch.sigmoid_(x * (2 * alpha))
            gd = torch.addcmul(s, s, s, value=-1.0)  # s (1 - s)
            dw = 2 * _other_axes_sum(s.mul_(dy), cd) - db if need_w else None
            gd.mul_(dy).mul_(4 * w)
        else:  # erf'(z) = 2 / sqrt(pi) * exp(-z^2)
            gd = torch.addcmul(shift, x, alpha) if shift is not None else x * alpha  # z
            dw = _other_axes_sum(torch.erf(gd).mul_(dy), cd) if need_w else None
            gd.square_().neg_().exp_().mul_(dy).mul_(w * _TWO_OVER_SQRT_PI)
        # gd = dL/dz: the scalars' gradients first, then dx in place
        da = torch.dot(gd.reshape(-1), x.reshape(-1)).reshape(alpha.shape) if need_a else None
        ds = gd.sum().reshape(shift.shape) if need_s else None
        dx = gd.mul_(alpha) if need_x else None
        return dx, da, ds, dw, db if (need_b and ctx.has_bias) else None, None, None


def _differentiable_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    """The gradients as torch operations that autograd differentiates again (a double
    backward): the equation's gradient, taken by autograd with ``create_graph``."""
    x, alpha, shift, weight = ctx.saved_tensors
    need = ctx.needs_input_grad[:4]
    wanted = [t for t, n in zip((x, alpha, shift, weight), need) if n]
    got = iter(torch.autograd.grad(_equation(ctx.kind, x, alpha, shift, weight, ctx.cd), wanted, dy,
                                   create_graph=True) if wanted else ())
    db = _other_axes_sum(dy, ctx.cd) if ctx.needs_input_grad[4] and ctx.has_bias else None
    return (*[next(got) if n else None for n in need], db, None, None)


def _equation(kind: str, x: Tensor, alpha: Tensor, shift: Tensor | None, weight: Tensor | None, cd: int) -> Tensor:
    """``weight * f(alpha * x + shift)`` (without the bias), out of place."""
    z = x * alpha if shift is None else torch.addcmul(shift, x, alpha)
    f = torch.tanh(z) if kind == "tanh" else torch.erf(z)
    return f if weight is None else f * per_channel(weight, x.ndim, cd).to(x.dtype)


def _kernel_layout(x: Tensor, cd: int) -> str | None:
    """The compiled kernels' layout for ``x`` ("cl": rows with the channel axis last, "cf":
    channel-first), or None where the torch operations run."""
    if route("squash", x, cd) != "kernels":
        return None
    return kernel_views(x, cd)[0]  # type: ignore[index]


def _view(t: Tensor, like: Tensor, cd: int, layout: str) -> Tensor:
    """``t`` as the kernels take it: (M, C) rows ("cl") or (N, C, L) ("cf"), in the layout of
    ``like`` (``x``; an incoming gradient in another layout is copied into it)."""
    v = dy_view(t, like, cd, layout)
    return v.reshape(-1, v.shape[-1]) if layout == "cl" else v


def _kernel_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    x, alpha, shift, weight = ctx.saved_tensors
    need_x, need_a, need_s, need_w, need_b = ctx.needs_input_grad[:5]
    dx = torch.empty_like(x)
    cd, layout = ctx.cd, ctx.layout
    dw, db, dalpha, dshift = _ew.squash_backward(_view(dy, x, cd, layout), _view(x, x, cd, layout),
                                                  _view(dx, x, cd, layout), layout, ctx.kind, alpha.item(),
                                                  0.0 if shift is None else shift.item(), weight)
    return (dx if need_x else None, torch.full_like(alpha, dalpha) if need_a else None,
            torch.full_like(shift, dshift) if need_s else None, dw.to(weight.dtype) if need_w else None,
            db.to(ctx.bias_dtype) if need_b and ctx.has_bias else None, None, None)


def _affine_vectors(x: Tensor, weight: Tensor | None, bias: Tensor | None, cd: int) -> tuple[Tensor, Tensor]:
    """weight and bias viewed along the channel axis; 1 and 0 where absent."""
    c = x.shape[cd]
    w = weight if weight is not None else x.new_ones(c)
    b = bias if bias is not None else x.new_zeros(c)
    return per_channel(w, x.ndim, cd).to(x.dtype), per_channel(b, x.ndim, cd).to(x.dtype)


def _check_scalar(name: str, who: str, t: Tensor | None) -> None:
    if t is not None and t.numel() != 1:
        raise ValueError(f"{who}: {name} must be a tensor with one element (a learned scalar), "
                         f"got shape {tuple(t.shape)}")


def _check_vector(name: str, who: str, t: Tensor | None, x: Tensor, channel_dim: int) -> None:
    c = x.shape[channel_axis(x.ndim, channel_dim)]
    if t is not None and (t.ndim != 1 or t.numel() != c):
        raise ValueError(f"{who}: {name} must have one value per channel, shape ({c},) for an input of shape "
                         f"{tuple(x.shape)} with channel_dim={channel_dim}, got shape {tuple(t.shape)}")


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
    for name, t in (("weight", weight), ("bias", bias)):
        _check_vector(name, "dynamic_tanh", t, x, channel_dim)
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
    for name, t in (("weight", weight), ("bias", bias)):
        _check_vector(name, "dynamic_erf", t, x, channel_dim)
    return _DynamicSquash.apply(x, alpha.to(x.dtype), None if shift is None else shift.to(x.dtype), weight, bias,
                                "erf", channel_dim)
