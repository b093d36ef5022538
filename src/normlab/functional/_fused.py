"""The fast CPU path shared by every batch, per-sample and mixed norm.

Each of these norms is, for every (sample n, channel c), an affine map of ``x``::

    y[n, c, ...] = scale[n, c] * x[n, c, ...] + shift[n, c]

where ``scale`` and ``shift`` are small functions of per-(n, c) moments of ``x`` (merged
exactly into per-channel, per-sample, per-group or mixed moments) and of the layer's
parameters. :class:`AffineFromMoments` runs that recipe in the fewest passes torch's CPU
kernels allow:

forward  one Welford pass for the per-(n, c) moments (``native_group_norm`` with one group
         per channel: vectorised and free of the ``E[x^2] - E[x]^2`` cancellation; it also
         writes ``x_hat``), the O(N*C) statistics function (its small graph kept for the
         backward), and one in-place pass turning ``x_hat`` into ``y``
         (``y = (scale / rstd) * x_hat + (scale * mean + shift)``);
backward per-(n, c) sums of ``dy`` and ``dy * x`` (one fused reduction), the O(N*C) backward
         of the statistics function by autograd on the small graph, and
         ``dx = A * dy + B * x + C`` in two passes over one fresh buffer.

Only ``x`` (one input-sized tensor) and the per-(n, c) moments are saved for backward. The
derivation: with ``mean = sum(x) / K`` and ``var = sum((x - mean)^2) / K`` over the K values
behind each moment, ``d mean / dx = 1 / K`` and ``d var / dx = 2 (x - mean) / K``; so with
``gm, gv`` the gradients of the loss with respect to the moments (from the small graph, fed
``dL/dscale = sum(dy * x)`` and ``dL/dshift = sum(dy)``)::

    dx = scale * dy + (2 gv / K) * x + (gm - 2 gv mean) / K

Channels-last tensors (the channel axis innermost in memory) take the same route on an
``(N, L, C)`` view, with the moments from the vectorised per-row batch-norm statistics
kernel, and give channels-last output. Anything else (CUDA, half precision, other strides,
``torch.compile``, synchronized statistics, small inputs: see :func:`fast_layout`) goes
through the plain autograd path, which the callers keep as their reference. Per-channel
norms (batch norm, batch renorm, mean-only batch norm) run on torch's batch-norm kernels
instead (:mod:`._fused_bn`).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .. import _kernels
from .._moments import Moments
from ._routing import (MIN_FAST_NUMEL, MIN_FUSED_NUMEL, MIN_KERNEL_GROUP_NUMEL, MIN_KERNEL_NUMEL, _views, dy_view,
                       fast_layout, fast_path, kernels_for)

__all__ = ["AffineFromMoments", "MIN_FAST_NUMEL", "MIN_FUSED_NUMEL", "MIN_KERNEL_GROUP_NUMEL", "MIN_KERNEL_NUMEL",
           "StatFn", "fast_layout", "fast_path", "kernels_for",
           "fused_affine_norm", "merged", "scale_shift", "standard_stat_fn"]

# stat_fn(moments, *params) -> (scale, shift), each broadcastable to (N, C)
StatFn = Callable[..., "tuple[Tensor, Tensor]"]

def _coef(t: Tensor, layout: str) -> Tensor:
    """Per-(n, c) coefficients shaped to broadcast against the layout's 3-d view (made
    contiguous: a broadcast operand with zero strides sends TensorIterator to a slow loop)."""
    t = t.contiguous()
    return t.unsqueeze(-1) if layout == "cf" else t.unsqueeze(1)


# the moment pass's epsilon: keeps its normalized output finite where a variance is 0, and is
# below the rounding of any variance above ~1e-23 (float32) or ~1e-14 (float64)
_EPS0 = 1e-30


def _moments_nc(v: Tensor, layout: str, per_channel: bool) -> tuple[Tensor, Tensor, int, Tensor | None, Tensor | None]:
    """(mean, biased var, count, x_hat, rstd0) per (n, c), or per channel if ``per_channel``.

    ``cf`` only: ``x_hat = (x - mean) * rstd0`` is the input-sized output of the moment pass
    (``rstd0 = 1 / sqrt(var + 1e-30)``), turned into ``y`` in place; else None.
    """
    if layout == "cf":
        n, c, length = v.shape
        buf, mean, rstd = torch.ops.aten.native_group_norm(v, None, None, n, c, length, c, _EPS0)
        var = (rstd.pow(-2) - _EPS0).clamp_min_(0.0)
        return mean, var, length, buf, rstd
    n, length, c = v.shape
    if per_channel:
        mean, var = torch.ops.aten.batch_norm_update_stats(v.reshape(n * length, c), None, None, 0.0)
        return mean.unsqueeze(0), var.unsqueeze(0), n * length, None, None
    # two-pass per-row statistics, vectorised over the contiguous channel axis, per sample
    pairs = [torch.ops.aten.batch_norm_update_stats(v[i], None, None, 0.0) for i in range(n)]
    mean = torch.stack([p[0] for p in pairs])
    var = torch.stack([p[1] for p in pairs])
    return mean, var, length, None, None


def _scale_shift_into(out: Tensor, v: Tensor, scale: Tensor, shift: Tensor, layout: str,
                      center: Tensor | None = None) -> None:
    """``out = (v - center) * scale + shift`` with (N, C) coefficients (``center`` default 0), one pass.

    Channel-first: the per-(n, c) map is batch norm's eval kernel on the (1, N*C, L) view
    (mean ``center``, var 1, eps 0), which vectorises where a broadcast ``addcmul`` does not.
    Channels-last: ``addcmul`` over the (N, L, C) view.
    """
    if center is not None:
        center = center.expand(scale.shape).to(v.dtype)
    if layout == "cf":
        n, c, length = v.shape
        mean = v.new_zeros(n * c) if center is None else center.reshape(-1)
        ones = v.new_ones(n * c)
        empty = v.new_empty(0)
        torch.ops.aten.native_batch_norm.out(
            v.view(1, n * c, length), scale.reshape(-1).to(v.dtype), shift.reshape(-1).to(v.dtype), mean, ones,
            False, 0.0, 0.0, out=out.view(1, n * c, length), save_mean=empty, save_invstd=empty)
    else:
        if center is not None:
            shift = shift - scale * center
        torch.addcmul(_coef(shift, layout).to(v.dtype), v, _coef(scale, layout).to(v.dtype), out=out)


def _sums(dyv: Tensor, v: Tensor, layout: str, center: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``sum(dy)`` and ``sum(dy * (x - center))`` as (N, C) tensors (``center`` default 0).

    Channel-first: one fused pass of batch norm's backward reduction on the (1, N*C, L)
    views (mean ``center``, invstd 1: its weight and bias gradients are exactly these sums).
    """
    n, c = v.shape[0], v.shape[1 if layout == "cf" else 2]
    center = v.new_zeros(n, c) if center is None else center.expand(n, c).to(v.dtype).contiguous()
    ones = v.new_ones(c if layout == "cl" else n * c)
    if layout == "cf":
        length = v.shape[2]
        _, h, g = torch.ops.aten.native_batch_norm_backward(
            dyv.reshape(1, n * c, length), v.view(1, n * c, length), ones, center.reshape(-1), ones, None, None,
            False, 0.0, [False, True, True])
        return g.view(n, c), h.view(n, c)
    # channels-last: the same reduction per sample, on (1, C, L, 1) channels-last views
    v4 = v.transpose(1, 2).unsqueeze(-1)
    d4 = dyv.transpose(1, 2).unsqueeze(-1)
    parts = [torch.ops.aten.native_batch_norm_backward(d4[i:i + 1], v4[i:i + 1], ones, center[i], ones, None, None,
                                                       False, 0.0, [False, True, True]) for i in range(n)]
    return torch.stack([p[2] for p in parts]), torch.stack([p[1] for p in parts])


class AffineFromMoments(torch.autograd.Function):
    """``y = scale(moments(x), params) * x + shift(...)`` per (n, c), with a derived backward.

    ``apply(x, stat_fn, channel_dim, per_channel, *params)`` returns ``(y, mean, var)``:
    ``mean``/``var`` are the (biased) moments of ``x`` per (n, c) as an (N, C) tensor (or per
    channel, (1, C), when ``per_channel`` and the layout allows it), returned without gradient
    so that callers can update running statistics from them. ``stat_fn(moments, *params)``
    receives ``Moments(count, mean, m2)`` and must return ``(scale, shift)`` broadcastable to
    (N, C), built from differentiable torch ops (its backward is taken by autograd on the
    small graph).
    """

    @staticmethod
    def forward(ctx, x: Tensor, stat_fn: StatFn, channel_dim: int, per_channel: bool, *params):  # type: ignore[override]
        layout, v = _views(x, channel_dim)  # type: ignore[misc]
        n = x.shape[0]
        c = x.shape[channel_dim]
        ctx.kernels = not per_channel and _kernels.available()
        if ctx.kernels:
            # compiled kernels: float64 moments, the small graph in float64, one centred pass
            mean, m2 = _kernels.moments(v, layout)
            count = v.numel() // max(n * c, 1)
            var = m2 / count
            buf = rstd0 = None
        else:
            mean, var, count, buf, rstd0 = _moments_nc(v, layout, per_channel)
        if any(ctx.needs_input_grad):
            # the O(N*C) graph of the statistics function, built once, differentiated in backward
            ctx.small = _small_graph(stat_fn, count, mean, var, params, n, c)
            scale, shift = ctx.small[0].detach(), ctx.small[1].detach()
        else:
            scale, shift = stat_fn(Moments(count, mean, var * count), *params)
            scale, shift = scale.expand(n, c), shift.expand(n, c)
        if ctx.kernels:
            # y = scale * x + shift = (x - mean) * scale + (scale * mean + shift): centred, so a
            # large |mean| / std costs no digits (the shift is formed in float64)
            y = torch.empty_like(x)
            _kernels.affine(v, _views(y, channel_dim)[1], layout, mean, scale, torch.addcmul(shift, scale, mean))  # type: ignore[index]
        elif buf is not None:
            # y = scale * x + shift = (scale / rstd0) * x_hat + (scale * mean + shift), in place
            _scale_shift_into(buf, buf, scale / rstd0, torch.addcmul(shift, scale, mean), layout)
            y = buf.view(x.movedim(channel_dim, 1).shape).movedim(1, channel_dim)
        else:
            y = torch.empty_like(x)
            _scale_shift_into(_views(y, channel_dim)[1], v, scale, shift, layout)  # type: ignore[index]
        ctx.stat_fn, ctx.channel_dim, ctx.count, ctx.layout = stat_fn, channel_dim, count, layout
        ctx.save_for_backward(x, mean, var, *params)
        mean_out, var_out = mean.to(x.dtype), var.to(x.dtype)
        ctx.mark_non_differentiable(mean_out, var_out)
        return y, mean_out, var_out

    @staticmethod
    def backward(ctx, dy: Tensor, _gm: Tensor, _gv: Tensor):  # type: ignore[override]
        x, mean, var, *params = ctx.saved_tensors
        cd, layout, count = ctx.channel_dim, ctx.layout, ctx.count
        if torch.is_grad_enabled():
            # create_graph=True (double backward): differentiate the plain-ops recomputation
            return _backward_differentiable(ctx, x, params, dy)
        n, c = x.shape[0], x.shape[cd]
        v = _views(x, cd)[1]  # type: ignore[index]
        dyv = dy_view(dy, x, cd, layout)
        scale, shift, wrt, leaves = ctx.small
        if ctx.kernels:
            g, h = _kernels.reduce(dyv, v, layout, mean)  # sum(dy), sum(dy * (x - mean)), float64
            h = torch.addcmul(h, mean, g)  # dL/dscale = sum(dy * x)
        else:
            g, h = _sums(dyv, v, layout)
        outs = [scale, shift] if shift.requires_grad else [scale]
        # retain_graph: a second backward through the outer graph (retain_graph=True there) reuses it
        grads = torch.autograd.grad(outs, wrt, [h, g][: len(outs)], retain_graph=True, allow_unused=True)
        gm = grads[0] if grads[0] is not None else torch.zeros_like(mean)
        gv = grads[1] if grads[1] is not None else torch.zeros_like(var)
        dx = None
        if ctx.needs_input_grad[0]:
            dx = torch.empty_like(x)
            dxv = _views(dx, cd)[1]  # type: ignore[index]
            if ctx.kernels:  # dx = scale * dy + (2 gv / K) (x - mean) + gm / K, one pass
                _kernels.dx(dyv, v, dxv, layout, mean, scale.detach(), (2.0 / count) * gv, gm / count)
            else:
                b = (2.0 / count) * gv
                const = (gm - 2.0 * gv * mean) / count
                # dx = b * x + const (one pass into the fresh buffer), then += scale * dy in place
                _scale_shift_into(dxv, v, b.expand(n, c), const.expand(n, c), layout)
                dxv.addcmul_(dyv, _coef(scale.detach(), layout))
        it = iter(grads[2:])
        pgrads = [next(it) if (p is not None and p.requires_grad) else None for p in leaves]
        return (dx, None, None, None, *pgrads)


def _small_graph(stat_fn: StatFn, count: int, mean: Tensor, var: Tensor, params: Sequence[Tensor | None], n: int,
                 c: int) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor | None]]:
    """``(scale, shift, wrt, leaves)``: the statistics function on fresh leaves (the moments and
    the parameters that require grad), with its graph; ``wrt`` lists the leaves to differentiate."""
    with torch.enable_grad():
        m = mean.detach().requires_grad_()
        s2 = var.detach().requires_grad_()
        leaves = [p.detach().requires_grad_() if (p is not None and p.requires_grad) else p for p in params]
        scale, shift = stat_fn(Moments(count, m, s2 * count), *leaves)
        scale, shift = scale.expand(n, c), shift.expand(n, c)
    return scale, shift, [m, s2] + [p for p in leaves if p is not None and p.requires_grad], leaves


def _backward_differentiable(ctx, x: Tensor, params: list, dy: Tensor) -> tuple:
    """The same gradients from a differentiable recomputation (moments by plain ops)."""
    cd, layout = ctx.channel_dim, ctx.layout
    n, c = x.shape[0], x.shape[cd]
    with torch.enable_grad():
        # the saved tensors carry their history here, so the result differentiates again
        xs = x if x.requires_grad else x.detach().requires_grad_()
        leaves = list(params)
        v = _views(xs, cd)[1]  # type: ignore[index]
        red = 2 if layout == "cf" else 1
        dims = (0, 1) if ctx.count != v.shape[red] else (red,)  # per channel or per (n, c)
        mean = v.mean(dims, keepdim=True)
        var = ((v - mean) ** 2).mean(dims, keepdim=True)
        sq = (lambda t: t.squeeze(red)) if len(dims) == 1 else (lambda t: t.reshape(1, c))
        scale, shift = ctx.stat_fn(Moments(ctx.count, sq(mean), sq(var) * ctx.count), *leaves)
        y = v * _coef(scale.expand(n, c), layout) + _coef(shift.expand(n, c), layout)
        wrt = ([xs] if ctx.needs_input_grad[0] else []) + [p for p in leaves if p is not None and p.requires_grad]
        dyv = dy_view(dy, x, cd, layout)
        grads = list(torch.autograd.grad(y, wrt, dyv, create_graph=True, allow_unused=True))
    dx = grads.pop(0) if ctx.needs_input_grad[0] else None
    it = iter(grads)
    pgrads = [next(it) if (p is not None and p.requires_grad) else None for p in leaves]
    return (dx, None, None, None, *pgrads)


class _NoGraph:
    """A stand-in for the autograd context when :class:`AffineFromMoments` runs without grad."""

    def __init__(self, n_inputs: int) -> None:
        self.needs_input_grad = (False,) * n_inputs

    def save_for_backward(self, *tensors: Tensor | None) -> None:
        pass

    def mark_non_differentiable(self, *tensors: Tensor) -> None:
        pass


def fused_affine_norm(
    x: Tensor, channel_dim: int, stat_fn: StatFn, params: Sequence[Tensor | None], per_channel: bool = False
) -> tuple[Tensor, Moments]:
    """Run :class:`AffineFromMoments`; returns ``y`` and the detached moments it used."""
    if torch.is_grad_enabled():
        y, mean, var = AffineFromMoments.apply(x, stat_fn, channel_dim % x.ndim, per_channel, *params)
    else:  # nothing to differentiate (eval, inference): skip the statistics function's graph
        y, mean, var = AffineFromMoments.forward(_NoGraph(len(params) + 4), x, stat_fn, channel_dim % x.ndim,
                                                 per_channel, *params)
    count = x.numel() // (mean.numel()) if mean.numel() else 0
    return y, Moments(count, mean, var * count)


def _row(v: Tensor | None) -> Tensor | None:
    """A length-C parameter as a (1, C) row, to broadcast against (N, C) statistics."""
    return None if v is None else v.reshape(1, -1)


def scale_shift(
    mean: Tensor | None, var: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Per-(n, c) ``(scale, shift)`` of ``weight * (x - mean) / sqrt(var + eps) + bias``.

    ``mean``/``var`` broadcast against (N, C); ``mean=None`` is the uncentred (RMS) form.
    """
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * _row(weight)
    shift = -mean * scale if mean is not None else torch.zeros_like(scale)
    if bias is not None:
        shift = shift + _row(bias)
    return scale, shift


def merged(m: Moments, over: str, num_groups: int = 1) -> Moments:
    """Exact merge of (N, C) per-(n, c) moments into those a norm uses, kept broadcastable.

    ``over``: "batch" (per channel, (1, C)), "sample" (per sample, (N, 1)), "spatial"
    (unchanged), "group" (per sample and group of C/G consecutive channels, (N, C)).
    """
    from .._moments import reduce_moments

    if over == "batch":
        return reduce_moments(m, 0)
    if over == "sample":
        return reduce_moments(m, 1)
    if over == "spatial":
        return m
    if over == "group":
        n, c = m.mean.shape
        g = Moments(m.count, m.mean.reshape(n, num_groups, c // num_groups), m.m2.reshape(n, num_groups, c // num_groups))
        r = reduce_moments(g, 2)
        return Moments(r.count, r.mean.expand(n, num_groups, c // num_groups).reshape(n, c),
                       r.m2.expand(n, num_groups, c // num_groups).reshape(n, c))
    raise ValueError(f"unknown statistics axes {over!r}")


def standard_stat_fn(over: str, eps: float, num_groups: int = 1, center: bool = True) -> StatFn:
    """The statistics function of bn / ln / in / gn (``center=False``: rms over ``over``)."""

    def fn(m: Moments, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        if not center:
            # mean of squares of the union = mean over the slots of (var + mean^2), equal counts
            ms = (m.m2 / m.count + m.mean * m.mean)
            ms = ms.mean(0, keepdim=True) if over == "batch" else ms.mean(1, keepdim=True) if over == "sample" else ms
            return scale_shift(None, ms, eps, weight, bias)
        r = merged(m, over, num_groups)
        return scale_shift(r.mean, r.var, eps, weight, bias)

    return fn
