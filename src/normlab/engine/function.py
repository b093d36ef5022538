"""The engine: one autograd Function that runs any statistics norm's description on the
compiled kernels.

forward:  per-(n, c) moments (one read)  ->  description.coefficients (small, (N, C))
          ->  y = act((x - center) * scale + shift)  (one read, one write; act: ReLU, leaky
          ReLU, SiLU, exact GELU, FRN's TLU max(., tau) or none)
backward: per-(n, c) g = sum dy', h = sum dy' (x - center)  (one read of dy and x; dy' = dy
          times the activation's derivative, recomputed from x; with the TLU also
          sum (dy - dy'), tau's gradient)  ->  description.input_grad
          ->  dx = a * dy' + b * (x - center) + k  (one pass)

Per-sample norms (:class:`GroupStats`) without an activation run both passes fused per
(sample, group), or per sample channels-last, from cache when there are at least two such
items a thread (:func:`normlab._kernels.group_forward` / ``group_backward``; EvoNorm-S0, whose
description runs its own element map, ``evos0_forward`` / ``evos0_backward``); the transformer's
layer and RMS norm over the channel axis alone run row by row (``rows_*``); batch norm on a
large float32/float64 channel-first input with long rows runs one channel at a time, its
moments then its output (and backward its sums then its input gradient) from cache
(``batch_forward`` / ``batch_backward``). Only ``x`` (one
input-sized tensor, in its own dtype) and (N, C) statistics are saved for backward.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .. import _kernels
from .._moments import Moments
from .describe import BatchStats, Description, GroupStats
from .routing import dy_view, fast_path, kernel_views, view_like

__all__ = ["EngineNorm", "run", "kernel_moments"]


def _fused(desc: Description, x: Tensor, layout: str, n: int, c: int, length: int,
           act: tuple[int, float] | None) -> str | None:
    """Which fused passes apply (besides the row passes: :func:`_on_rows`): "group" (per (sample,
    group) or per sample from cache: group norms and EvoNorm-S0, the per-sample norms that have
    ``groups``), "batch" (batch norm per channel from cache, where measured faster:
    :func:`_batch_fusable`) or None (the generic passes). The fused passes need at least two work
    items a thread."""
    if desc.moments_given is not None:
        return None
    if desc.groups is None:
        return "batch" if _batch_fusable(desc, x, layout, c, length, act) else None
    items = n * desc.groups if layout == "cf" else n  # type: ignore[operator]
    return "group" if items >= 2 * torch.get_num_threads() else None


# Batch norm one channel a work item (_batch_fusable): measured here (2 threads, AVX2, float32,
# forward+backward, paired rounds) over the generic passes: 0.86-0.89 at (32, 64, 56, 56) in three
# runs, 0.84 at (16, 32, 112, 112); 0.97-1.01 at (64, 64, 56, 56) and (8, 64, 56, 56), 0.99 at
# (32, 128, 28, 28), 1.08-1.11 at (64, 256, 14, 14) and (128, 512, 7, 7) (short rows: N strided
# reads of a channel's rows instead of one sequential read); bfloat16 0.95-1.06 (its passes are
# bound by the conversions more than by memory). The backward alone (what batch renorm, whose
# forward needs the merged batch for r and d, takes): 0.74 of the generic sums, adjoint and
# input-gradient pass at (32, 64, 3136) float32, caches flushed before each call, two runs.
BATCH_FUSED_MIN_LENGTH = 2048  # values a (sample, channel) row
BATCH_FUSED_MIN_BYTES = 16 << 20  # the input's size


def _batch_fusable(desc: Description, x: Tensor, layout: str, c: int, length: int,
                   act: tuple[int, float] | None, backward: bool = False) -> bool:
    """Batch norm channel-first, one channel a work item (:func:`normlab._kernels.batch_forward`):
    float32 or float64, rows and input at least the sizes above, without synchronization (its
    merge needs every channel first), an activation without a threshold, at least two channels a
    thread; forward also without renormalization (its r and d come from the merged batch), which
    ``backward`` allows (the backward of batch renorm is batch norm's with weight w r)."""
    return (isinstance(desc, BatchStats) and layout == "cf" and desc.group is None
            and (backward or desc.renorm is None)
            and not desc.keeps_moments and x.dtype in (torch.float32, torch.float64)
            and length >= BATCH_FUSED_MIN_LENGTH and x.numel() * x.element_size() >= BATCH_FUSED_MIN_BYTES
            and (act is None or act[0] != _kernels.EPILOGUES["tlu"]) and c >= 2 * torch.get_num_threads())


def _bias(params: Sequence[Tensor | None]) -> Tensor | None:
    return params[1] if len(params) > 1 else None


def kernel_moments(x: Tensor, cd: int) -> tuple[Tensor, Tensor, int]:
    """Per-(n, c) mean and M2 (float64 (N, C)) of ``x`` on the kernels, and the count behind each."""
    layout, v = kernel_views(x, cd)  # type: ignore[misc]
    mean, m2 = _kernels.moments(v, layout)
    return mean, m2, v.numel() // max(mean.numel(), 1)


def _forward(ctx, x: Tensor, desc: Description, cd: int, act: tuple[int, float] | None,
             params: Sequence[Tensor | None]) -> Tensor:
    desc.dtype = x.dtype
    if _on_rows(desc, x, cd, act):  # (the channels innermost in memory: x's rows as they are)
        ctx.fused, ctx.batch_backward = "rows", False
        y = torch.empty_like(x)  # (in x's memory format)
        desc.rows = _kernels.rows_forward(_rows_of(x, cd), _rows_of(y, cd), desc.eps, params[0],
                                          _bias(params) if desc.center else None, desc.center)
        return y
    layout, v = kernel_views(x, cd)  # type: ignore[misc]
    n, c = x.shape[0], x.shape[cd]
    length = v.numel() // max(n * c, 1)
    ctx.fused = _fused(desc, x, layout, n, c, length, act)
    y = torch.empty_like(x)
    yv = view_like(y, layout, cd)
    if desc.elementwise:  # its own element map (EvoNorm): its own passes, per sample from cache or not
        mean, m2 = desc.forward(v, yv, layout, length, params, ctx.fused == "group")
    elif ctx.fused == "batch":
        mean, m2 = _kernels.batch_forward(v, yv, desc.eps, desc.mean_only, params[0], _bias(params), act)  # type: ignore[attr-defined]
        desc.keep(Moments(n * length, mean, m2), params[0])  # type: ignore[attr-defined]
    elif ctx.fused == "group":
        mean, m2, ctr, rstd = _kernels.group_forward(v, yv, layout, desc.groups, desc.eps, desc.center,  # type: ignore[arg-type]
                                                     params[0], _bias(params), act, desc.keeps_moments)
        desc.keep(ctr, rstd, length, params[0])  # type: ignore[attr-defined]
    else:
        mean, m2 = desc.moments_given or _kernels.moments(v, layout)
        ctx.coefs = desc.coefficients(mean, m2, length, *params)
        desc.moments_given = None  # (used: not kept on the autograd context to the backward, see keeps_moments)
        _kernels.affine(v, yv, layout, *ctx.coefs, act=act)
    # backward one channel at a time: after the fused forward, or batch renorm's generic one
    ctx.batch_backward = ctx.fused == "batch" or (ctx.fused is None and _batch_fusable(desc, x, layout, c, length,
                                                                                         act, backward=True))
    if desc.keeps_moments:
        desc.mean_nc, desc.m2_nc, desc.count_nc = mean, m2, length
    return y


def _on_rows(desc: Description, x: Tensor, cd: int, act: tuple | None) -> bool:
    """Whether the row passes run (layer or RMS norm over the channels of each position, one
    read of each row forward and backward): a per-position description, or layer or RMS norm
    (one group) over an input with one position a sample, whose statistics are the same, laid
    out as rows; the row kernels have no epilogue."""
    if desc.per_position:
        return True
    return (isinstance(desc, GroupStats) and desc.groups == 1 and act is None and desc.moments_given is None
            and not desc.keeps_moments and x.numel() == x.shape[0] * x.shape[cd] and _rows_of(x, cd).is_contiguous())


def _rows_of(t: Tensor, cd: int) -> Tensor:
    """``t`` with its channel axis ``cd`` last: contiguous for the row passes' input, output and
    gradients (a view inside the Function: no graph node)."""
    return t if cd == t.ndim - 1 else t.movedim(cd, -1)


class EngineNorm(torch.autograd.Function):
    """``apply(x, desc, channel_dim, act, threshold, *params)``: the norm ``desc`` describes, with
    an optional activation epilogue (``act``: a :class:`normlab._kernels.Epilogue` from
    :func:`normlab.engine.epilogue`; None: none) and ``threshold``, the epilogue's threshold
    tensor (the TLU's; None otherwise), an input here so that it gets its gradient. After the
    call ``desc.mean_nc``, ``desc.m2_nc`` (float64 (N, C); where ``desc.keeps_moments``) or, for
    batch norms, ``desc.batch_moments`` hold the moments for running statistics."""

    @staticmethod
    def forward(ctx, x: Tensor, desc: Description, channel_dim: int, act: tuple | None,  # type: ignore[override]
                threshold: Tensor | None, *params: Tensor | None) -> Tensor:
        y = _forward(ctx, x, desc, channel_dim, act, params)
        ctx.desc, ctx.cd, ctx.act = desc, channel_dim, None if act is None else tuple(act[:2])
        # x is the one input-sized tensor kept, unless the adjoint never reads it (mean-only)
        ctx.save_for_backward(x if desc.needs_input or act is not None else None, threshold, *params)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, threshold, *params = ctx.saved_tensors
        desc, cd = ctx.desc, ctx.cd
        act = None if ctx.act is None else (*ctx.act, threshold)
        need_x, need_t, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[4], ctx.needs_input_grad[5:]
        if torch.is_grad_enabled():  # (x not saved: the map's derivative does not depend on it)
            return (*_double_backward(ctx, torch.zeros_like(dy) if x is None else x, threshold, params, dy),)
        if x is None:  # (not saved: the adjoint has b = 0, so dy stands in for x)
            x = dy if kernel_views(dy, cd) is not None else dy.contiguous()
        if ctx.fused == "rows":  # (dy read in x's memory format; the kernel writes dx also where only the
            dx = torch.empty_like(x)  # parameters' gradients are asked)
            dyr = _rows_of(dy, cd)
            dyr = dyr if dyr.is_contiguous() else _rows_of(torch.empty_like(x).copy_(dy), cd)
            grads = _kernels.rows_backward(dyr, _rows_of(x, cd), _rows_of(dx, cd), params[0], *desc.rows,
                                           bool(need_p[0]), desc.center and bool(need_p[1]))
            return (dx if need_x else None, None, None, None, None,
                    *(None if g is None else g.to(p.dtype) for g, p in zip(grads, params)))
        layout, v = kernel_views(x, cd)  # type: ignore[misc]
        dyv = dy_view(dy, x, cd, layout)
        dx = torch.empty_like(x) if need_x else None
        dxv = view_like(dx, layout, cd) if need_x else None
        if desc.elementwise:
            return (dx, None, None, None, None, *desc.backward(dyv, v, dxv, layout, need_p, *params))
        if ctx.batch_backward and need_x:  # (weight and shift as the output pass had them: w r, w d + b in renorm)
            center, _, shift = ctx.coefs if ctx.fused is None else desc.affine_coefficients(_bias(params))
            g, h = _kernels.batch_backward(dyv, v, dxv, center, desc.rstd, desc.mean_only, desc.w, shift, act)
            e = []
        elif ctx.fused == "group" and need_x:
            g, h, *e = _kernels.group_backward(dyv, v, dxv, layout, desc.groups, desc.center, params[0], desc.ctr,
                                               desc.rstd, _bias(params), act)
        else:
            center, scale, shift = ctx.coefs if ctx.fused is None else desc.affine_coefficients(_bias(params))
            g, h, *e = _kernels.reduce(dyv, v, layout, center, act, scale, shift, keep=dxv)
            if need_x:
                a, b, k = desc.input_grad(g, h, *params)
                _kernels.dx(dyv, v, dxv, layout, center, a, b, k, act, scale, shift, kept=True)  # type: ignore[arg-type]
        # the threshold's gradient: its per-(n, c) sums of dy - dy', summed to its shape
        dt = e[0].sum_to_size(threshold.shape).to(threshold.dtype) if need_t else None
        return (dx, None, None, None, dt, *desc.param_grads(g, h, need_p, *params))


def _double_backward(ctx, x: Tensor, threshold: Tensor | None, params: list, dy: Tensor) -> tuple:
    """create_graph=True: differentiate the norm's plain function (the reference) instead."""
    desc, act = ctx.desc, ctx.act
    if desc.reference is None:
        raise NotImplementedError("double backward through a normlab engine call needs its reference function "
                                  "(call the public function, or run under normlab.functional.fast_path(False))")
    need = ctx.needs_input_grad
    with torch.enable_grad(), fast_path(False):
        xs = x if x.requires_grad else x.detach().requires_grad_()
        y = desc.reference(xs, *params)
        if act is not None:
            from . import activate  # (the package's helper; imported here: the package imports this module)

            y = activate(y, (*act, threshold), ctx.cd)
        inputs = [xs, threshold, *params]
        flags = [need[0], *need[4:]]
        wrt = [t for t, k in zip(inputs, flags) if k]
        grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
    got = [next(grads) if k else None for k in flags]
    return (got[0], None, None, None, *got[1:])


class _NoGraph:
    """The autograd context's stand-in when nothing needs a gradient."""


def run(desc: Description, x: Tensor, channel_dim: int, params: Sequence[Tensor | None],
        act: tuple | None = None) -> Tensor:
    """The norm ``desc`` describes on ``x`` (a CPU tensor with a kernel view: the route said
    "kernels"), with the epilogue ``act`` (:func:`normlab.engine.epilogue`), through
    :class:`EngineNorm` when anything needs a gradient (the epilogue's threshold included), else
    its forward alone (no graph, nothing saved)."""
    threshold = _kernels.threshold_of(act)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, threshold, *params)):
        return EngineNorm.apply(x, desc, channel_dim, act, threshold, *params)
    return _forward(_NoGraph(), x, desc, channel_dim, act, params)
