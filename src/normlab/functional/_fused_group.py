"""Per-sample norms (group, instance, layer, RMS norm) on normlab's compiled kernels, with a
closed-form backward.

Each of these normalizes every (sample n, group g) of C/G consecutive channels over its
K = L * C / G values (L positions)::

    y = weight_c * (x - mu_ng) * rstd_ng + bias_c        rstd_ng = 1 / sqrt(var_ng + eps)
    (RMS: mu = 0 and rstd_ng = 1 / sqrt(mean(x^2) + eps), no bias)

forward   per-(n, c) moments merged exactly into per-(n, g) ones, then one pass (channels-last
          with enough samples: both in one pass per sample, see ``nl_group_fwd_cl``);
backward  per-(n, c) ``g = sum dy`` and ``h = sum dy (x - mu_ng)`` in one fused reduction,
          then one pass::

              A_ng = sum_{c in g} weight_c g_nc      B_ng = sum_{c in g} weight_c h_nc
              dx = weight_c rstd dy - rstd^3 B / K (x - mu) - rstd A / K     (RMS: no A term)
              dweight_c = sum_n rstd_ng h_nc         dbias_c = sum_n g_nc

Only ``x`` and (N, C) statistics are saved. This replaces the generic statistics-function
route of :class:`._fused.AffineFromMoments` (whose small autograd graph costs about 0.3 ms a
step) for these norms whenever the kernels are available.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _kernels
from ._routing import dy_view, kernel_views

__all__ = ["GroupNormKernel", "group_norm_kernel"]


def _group_stats(mean: Tensor, m2: Tensor, count: int, groups: int, eps: float, center: bool) -> tuple[Tensor, Tensor]:
    """Per-(n, c) group centre (0 for RMS) and rstd, float64 (N, C), from per-(n, c) moments."""
    n, c = mean.shape
    mg, qg = mean.view(n, groups, -1), m2.view(n, groups, -1)
    if center:
        mu = mg.mean(2, keepdim=True)  # equal counts per channel: the exact merge
        var = (qg.sum(2, keepdim=True) / count + ((mg - mu) ** 2).sum(2, keepdim=True)) / (c // groups)
        ctr = mu.expand_as(mg).reshape(n, c)
    else:
        var = (qg / count + mg * mg).mean(2, keepdim=True)  # the mean square
        ctr = torch.zeros_like(mean)
    return ctr, var.add_(eps).rsqrt_().expand_as(mg).reshape(n, c)


def _one_pass(layout: str, n: int, groups: int) -> bool:
    """Whether the one-pass kernels apply: their work items ((sample, group) blocks
    channel-first, samples channels-last) must number at least two a thread; otherwise the
    two-kernel route, which splits every sample over the threads, is faster."""
    items = n * groups if layout == "cf" else n
    return items >= 2 * torch.get_num_threads()


def _two_pass_forward(v: Tensor, yv: Tensor, layout: str, count: int, groups: int, eps: float, center: bool,
                      weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Moments over every sample split across the threads, then the output: (mean, m2, ctr, rstd)."""
    mean, m2 = _kernels.moments(v, layout)
    ctr, rstd = _group_stats(mean, m2, count, groups, eps, center)
    scale = rstd if weight is None else rstd * weight.detach().to(rstd.dtype)
    shift = torch.zeros_like(rstd) if bias is None else bias.detach().to(rstd.dtype).expand_as(rstd)
    _kernels.affine(v, yv, layout, ctr, scale, shift)
    return mean, m2, ctr, rstd


class GroupNormKernel(torch.autograd.Function):
    """``apply(x, weight, bias, channel_dim, num_groups, eps, center)`` -> ``(y, mean, var)``
    with ``mean``/``var`` the per-(n, c) moments (non-differentiable, for running statistics)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int,  # type: ignore[override]
                num_groups: int, eps: float, center: bool, need_moments: bool = True):
        layout, v = kernel_views(x, channel_dim)  # type: ignore[misc]
        n, c = x.shape[0], x.shape[channel_dim]
        count = v.numel() // max(n * c, 1)
        ctx.channel_dim, ctx.groups, ctx.eps, ctx.center, ctx.count = channel_dim, num_groups, eps, center, count
        ctx.layout, ctx.group_stats = layout, False
        one_pass = _one_pass(layout, n, num_groups)
        if (one_pass and layout == "cf" and center and not need_moments
                and all(p is None or p.dtype == x.dtype for p in (weight, bias))):
            # torch's own group-norm forward (one vectorised Welford pass per group, then the
            # output from cache) is a little faster than ours; the backward below is ours
            # (its per-(n, g) statistics are expanded to per-(n, c) in the backward)
            y3, mg, rg = torch.ops.aten.native_group_norm(v, weight, bias, n, c, count, num_groups, eps)
            ctx.save_for_backward(x, weight, bias, mg, rg)
            ctx.group_stats = True
            return y3.view(x.movedim(channel_dim, 1).shape).movedim(1, channel_dim), None, None
        y = torch.empty_like(x)
        yv = kernel_views(y, channel_dim)[1]  # type: ignore[index]
        if one_pass:
            # moments and output in one pass per (sample, group) or per sample, from cache
            mean, m2, ctr, rstd = _kernels.group_forward(v, yv, layout, num_groups, eps, center, weight, bias)
        else:  # few work items: split every sample over the threads instead
            mean, m2, ctr, rstd = _two_pass_forward(v, yv, layout, count, num_groups, eps, center, weight, bias)
        ctx.save_for_backward(x, weight, bias, ctr, rstd)
        var = m2 / count
        ctx.mark_non_differentiable(mean, var)
        return y, mean, var

    @staticmethod
    def backward(ctx, dy: Tensor, _gm: Tensor, _gv: Tensor):  # type: ignore[override]
        x, weight, bias, ctr, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        nones = (None,) * 5
        if torch.is_grad_enabled():  # double backward: differentiate a plain recomputation
            return _double_backward(ctx, x, weight, bias, dy) + nones
        cd, layout, groups = ctx.channel_dim, ctx.layout, ctx.groups
        n, c = x.shape[0], x.shape[cd]
        if ctx.group_stats:  # per-(n, g) statistics of torch's forward
            ctr, rstd = (t.double().unsqueeze(2).expand(n, groups, c // groups).reshape(n, c) for t in (ctr, rstd))
        v = kernel_views(x, cd)[1]  # type: ignore[index]
        dyv = dy_view(dy, x, cd, layout, kernel=True)
        dx = torch.empty_like(x) if need[0] else None
        if need[0] and _one_pass(layout, n, groups):
            # both passes per (sample, group) or per sample, the second from cache
            g, h = _kernels.group_backward(dyv, v, kernel_views(dx, cd)[1], layout, groups, ctx.center, weight, ctr, rstd)  # type: ignore[index]
        else:
            g, h = _kernels.reduce(dyv, v, layout, ctr)  # sum dy, sum dy (x - mu_ng)
            if need[0]:
                w = torch.ones(c, dtype=rstd.dtype) if weight is None else weight.detach().to(rstd.dtype)
                k = ctx.count * (c // groups)  # values per group
                big_a = (g * w).view(n, groups, -1).sum(2, keepdim=True).expand(n, groups, c // groups).reshape(n, c)
                big_b = (h * w).view(n, groups, -1).sum(2, keepdim=True).expand(n, groups, c // groups).reshape(n, c)
                const = -rstd * big_a / k if ctx.center else torch.zeros_like(rstd)
                _kernels.dx(dyv, v, kernel_views(dx, cd)[1], layout, ctr, w * rstd, -rstd ** 3 * big_b / k, const)  # type: ignore[index]
        dw = (rstd * h).sum(0).to(weight.dtype) if need[1] else None
        db = g.sum(0).to(bias.dtype) if need[2] else None
        return (dx, dw, db) + nones


def _double_backward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, dy: Tensor) -> tuple:
    need = ctx.needs_input_grad[:3]
    with torch.enable_grad():
        xs = x if x.requires_grad else x.detach().requires_grad_()
        xm = xs.movedim(ctx.channel_dim, 1)
        xg = xm.reshape(xm.shape[0], ctx.groups, -1)
        if ctx.center:
            mu = xg.mean(2, keepdim=True)
            xhat = (xg - mu) * torch.rsqrt(((xg - mu) ** 2).mean(2, keepdim=True) + ctx.eps)
        else:
            xhat = xg * torch.rsqrt((xg * xg).mean(2, keepdim=True) + ctx.eps)
        y = xhat.reshape(xm.shape)
        shape = [1, -1] + [1] * (xm.ndim - 2)
        if weight is not None:
            y = y * weight.view(shape)
        if bias is not None:
            y = y + bias.view(shape)
        y = y.movedim(1, ctx.channel_dim)
        wrt = [t for t, k in zip((xs, weight, bias), need) if k]
        grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
    return tuple(next(grads) if k else None for k in need)


def group_norm_kernel(x: Tensor, channel_dim: int, num_groups: int, eps: float, center: bool,
                      weight: Tensor | None, bias: Tensor | None,
                      need_moments: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(y, mean, var)``: the norm on the compiled kernels (callers check availability and
    layout first); ``mean``/``var`` are the per-(n, c) moments, float64 (N, C), if
    ``need_moments`` (else they may be None)."""
    cd = channel_dim % x.ndim
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return GroupNormKernel.apply(x, weight, bias, cd, num_groups, eps, center, need_moments)
    # nothing to differentiate (eval, inference): the forward alone
    layout, v = kernel_views(x, cd)  # type: ignore[misc]
    y = torch.empty_like(x)
    yv = kernel_views(y, cd)[1]  # type: ignore[index]
    count = v.numel() // max(x.shape[0] * x.shape[cd], 1)
    if _one_pass(layout, x.shape[0], num_groups):
        mean, m2 = _kernels.group_forward(v, yv, layout, num_groups, eps, center, weight, bias)[:2]
    else:
        mean, m2 = _two_pass_forward(v, yv, layout, count, num_groups, eps, center, weight, bias)[:2]
    return y, mean, m2 / count
