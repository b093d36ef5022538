"""Switchable norm on normlab's compiled kernels, with its statistics function differentiated
by hand (the generic route, :class:`._fused.AffineFromMoments`, builds and differentiates a
small autograd graph of some 40 operations: about 0.5 ms a step, a tenth of the layer).

Per (sample n, channel c), with per-(n, c) moments over the K_in = L positions, merged
exactly into the layer moments (per n, over C L values) and the batch moments (per c, over
N L values, or the running ones)::

    mu = sum_k a_k mu_k     var = sum_k b_k var_k     (a = softmax(mean_weight), b = softmax(var_weight))
    y = weight_c (x - mu) rstd + bias_c,   rstd = 1 / sqrt(var + eps)

Backward, from ``g = sum dy`` and ``h = sum dy (x - mu)`` per (n, c)::

    G_mu = -weight rstd g                   G_var = -1/2 weight rstd^3 h       (per (n, c))
    dL/da_k = sum_nc G_mu mu_k              dL/db_k = sum_nc G_var var_k       (then the softmax)
    dx = weight rstd dy + sum_k [ G_mu,k / K_k + 2 G_var,k (x - mu_k) / K_k ]

where ``G_mu,k`` is ``a_k G_mu`` summed over the values that share statistic k (nothing for
instance, over c for layer, over n for batch) and K_k its count: one pass, centred on the
per-(n, c) mean. An input without positions mixes the layer and batch moments only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _kernels
from ._routing import dy_view, fast_path, kernel_views

__all__ = ["SwitchableKernel"]


def _statistics(mu_in: Tensor, v_in: Tensor, fixed: tuple[Tensor, Tensor] | None, positions: bool):
    """The (mean, var, count divisor, reduced dims) of each statistic the norm mixes, float64."""
    n, c = mu_in.shape
    mu_ln = mu_in.mean(1, keepdim=True)
    v_ln = v_in.mean(1, keepdim=True) + ((mu_in - mu_ln) ** 2).mean(1, keepdim=True)
    stats = [(mu_ln, v_ln, c, 1)]
    if fixed is None:
        mu_bn = mu_in.mean(0, keepdim=True)
        stats.append((mu_bn, v_in.mean(0, keepdim=True) + ((mu_in - mu_bn) ** 2).mean(0, keepdim=True), n, 0))
    else:  # running statistics: constants
        stats.append((fixed[0], fixed[1], None, None))
    if positions:
        stats.insert(0, (mu_in, v_in, 1, None))
    return stats


class SwitchableKernel(torch.autograd.Function):
    """``apply(x, mean_weight, var_weight, weight, bias, channel_dim, eps, fixed)`` ->
    ``(y, mean, var)`` with the per-(n, c) moments (non-differentiable, for the running
    statistics); ``fixed``: the running (mean, var) as float64 (1, C) rows, or None for the
    batch's."""

    @staticmethod
    def forward(ctx, x: Tensor, mean_weight: Tensor, var_weight: Tensor, weight: Tensor | None,  # type: ignore[override]
                bias: Tensor | None, channel_dim: int, eps: float, fixed: tuple[Tensor, Tensor] | None,
                reference=None):
        layout, v = kernel_views(x, channel_dim)  # type: ignore[misc]
        n, c = x.shape[0], x.shape[channel_dim]
        length = v.numel() // max(n * c, 1)
        mu_in, m2 = _kernels.moments(v, layout)
        v_in = m2 / length
        stats = _statistics(mu_in, v_in, fixed, x.ndim > 2)
        k = len(stats)
        wm = torch.softmax(mean_weight.detach()[-k:].double(), 0)
        wv = torch.softmax(var_weight.detach()[-k:].double(), 0)
        mu = sum(w * s[0] for w, s in zip(wm.unbind(0), stats))
        rstd = torch.rsqrt(sum(w * s[1] for w, s in zip(wv.unbind(0), stats)) + eps)  # type: ignore[operator]
        w = torch.ones(1, c, dtype=torch.float64) if weight is None else weight.detach().double().view(1, c)
        shift = torch.zeros(1, c, dtype=torch.float64) if bias is None else bias.detach().double().view(1, c)
        y = torch.empty_like(x)
        _kernels.affine(v, kernel_views(y, channel_dim)[1], layout, mu, w * rstd, shift)  # type: ignore[index]
        ctx.channel_dim, ctx.layout, ctx.length, ctx.eps, ctx.fixed = channel_dim, layout, length, eps, fixed
        ctx.stats, ctx.wm, ctx.wv, ctx.w, ctx.reference = stats, wm, wv, w, reference
        ctx.save_for_backward(x, mean_weight, var_weight, weight, bias, mu_in, mu, rstd)
        ctx.mark_non_differentiable(mu_in, v_in)
        return y, mu_in, v_in

    @staticmethod
    def backward(ctx, dy: Tensor, _gm: Tensor, _gv: Tensor):  # type: ignore[override]
        x, mean_weight, var_weight, weight, bias, mu_in, mu, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad
        nones = (None,) * 4
        if torch.is_grad_enabled():  # double backward: differentiate the plain path
            return _double_backward(ctx, x, mean_weight, var_weight, weight, bias, dy) + nones
        cd, layout, length = ctx.channel_dim, ctx.layout, ctx.length
        n, c = mu_in.shape
        v = kernel_views(x, cd)[1]  # type: ignore[index]
        dyv = dy_view(dy, x, cd, layout, kernel=True)
        g, h = _kernels.reduce(dyv, v, layout, mu_in)
        h = h + (mu_in - mu) * g  # sum dy (x - mu)
        w, wm, wv, stats = ctx.w, ctx.wm, ctx.wv, ctx.stats
        g_mu = -w * rstd * g
        g_var = -0.5 * w * rstd ** 3 * h
        dx = None
        if need[0]:
            b_coef = torch.zeros_like(g_mu)
            k_coef = torch.zeros_like(g_mu)
            for i, (m_k, _v_k, share, dim) in enumerate(stats):
                if share is None:  # running statistics: constants
                    continue
                gm_k, gv_k = wm[i] * g_mu, wv[i] * g_var
                if dim is not None:
                    gm_k, gv_k = gm_k.sum(dim, keepdim=True), gv_k.sum(dim, keepdim=True)
                count = length * share
                b_coef = b_coef + 2 * gv_k / count
                k_coef = k_coef + gm_k / count + 2 * gv_k * (mu_in - m_k) / count
            dx = torch.empty_like(x)
            _kernels.dx(dyv, v, kernel_views(dx, cd)[1], layout, mu_in, w * rstd, b_coef, k_coef)  # type: ignore[index]
        d_mw = d_vw = None
        if need[1]:
            ga = torch.stack([(g_mu * s[0]).sum() for s in stats])
            d_mw = torch.zeros_like(mean_weight, dtype=torch.float64)
            d_mw[-len(stats):] = wm * (ga - (wm * ga).sum())
            d_mw = d_mw.to(mean_weight.dtype)
        if need[2]:
            gb = torch.stack([(g_var * s[1]).sum() for s in stats])
            d_vw = torch.zeros_like(var_weight, dtype=torch.float64)
            d_vw[-len(stats):] = wv * (gb - (wv * gb).sum())
            d_vw = d_vw.to(var_weight.dtype)
        dw = (rstd * h).sum(0).to(weight.dtype) if need[3] else None
        db = g.sum(0).to(bias.dtype) if need[4] else None
        return dx, d_mw, d_vw, dw, db, *nones


def _reference(ctx):
    """The public function whose plain path a double backward differentiates (handed in by its
    caller, so that this module does not import the public one: imports flow downward)."""
    if ctx.reference is None:
        raise NotImplementedError("double backward through a normlab kernel Function needs its reference "
                                  "function (call the public function, or run under fast_path(False))")
    return ctx.reference


def _double_backward(ctx, x, mean_weight, var_weight, weight, bias, dy) -> tuple:
    need = ctx.needs_input_grad[:5]
    fixed = ctx.fixed
    with torch.enable_grad(), fast_path(False):
        xs = x if x.requires_grad else x.detach().requires_grad_()
        running = (None, None) if fixed is None else (fixed[0].reshape(-1), fixed[1].reshape(-1))
        y = _reference(ctx)(xs, mean_weight, var_weight, running[0], running[1], weight, bias,
                                  training=fixed is None, momentum=None, eps=ctx.eps, channel_dim=ctx.channel_dim)
        inputs = (xs, mean_weight, var_weight, weight, bias)
        wrt = [t for t, k in zip(inputs, need) if k]
        grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if k else None for k in need)


class BatchInstanceKernel(torch.autograd.Function):
    """Batch-instance norm on the compiled kernels, differentiated by hand.

    ``y = weight (rho (x - mu_B) r_B + (1 - rho) (x - mu_I) r_I) + bias`` with the batch (per c,
    or running) and instance (per (n, c)) moments; as a per-(n, c) map centred on ``mu_I``:
    scale ``weight (rho r_B + (1 - rho) r_I)``, shift ``weight rho r_B (mu_I - mu_B) + bias``.
    Backward from ``g = sum dy``, ``h = sum dy (x - mu_I)`` per (n, c), ``G = sum_n g`` and
    ``H = sum_n (h + (mu_I - mu_B) g)`` per channel (the batch branch's sums)::

        dx = weight rho r_B (dy - G / NL - (x - mu_B) r_B^2 H / NL)            (batch statistics)
           + weight (1 - rho) r_I (dy - g / L - (x - mu_I) r_I^2 h / L)
        drho = weight (r_B H - sum_n r_I h)     dweight = rho r_B H + (1 - rho) sum_n r_I h

    ``apply(x, rho, weight, bias, channel_dim, eps, fixed)`` -> ``(y, mean, var)`` (per-(n, c)
    moments, non-differentiable); ``fixed`` as for :class:`SwitchableKernel`.
    """

    @staticmethod
    def forward(ctx, x: Tensor, rho: Tensor, weight: Tensor | None, bias: Tensor | None,  # type: ignore[override]
                channel_dim: int, eps: float, fixed: tuple[Tensor, Tensor] | None, reference=None):
        layout, v = kernel_views(x, channel_dim)  # type: ignore[misc]
        n, c = x.shape[0], x.shape[channel_dim]
        length = v.numel() // max(n * c, 1)
        mu_i, m2 = _kernels.moments(v, layout)
        v_i = m2 / length
        if fixed is None:
            mu_b = mu_i.mean(0, keepdim=True)
            v_b = v_i.mean(0, keepdim=True) + ((mu_i - mu_b) ** 2).mean(0, keepdim=True)
        else:
            mu_b, v_b = fixed
        r_b, r_i = torch.rsqrt(v_b + eps), torch.rsqrt(v_i + eps)
        p = rho.detach().double().view(1, c)
        w = torch.ones(1, c, dtype=torch.float64) if weight is None else weight.detach().double().view(1, c)
        shift = w * p * r_b * (mu_i - mu_b)
        if bias is not None:
            shift = shift + bias.detach().double().view(1, c)
        y = torch.empty_like(x)
        _kernels.affine(v, kernel_views(y, channel_dim)[1], layout, mu_i, w * (p * r_b + (1 - p) * r_i), shift)  # type: ignore[index]
        ctx.channel_dim, ctx.layout, ctx.length, ctx.eps, ctx.fixed = channel_dim, layout, length, eps, fixed
        ctx.small, ctx.reference = (mu_b, r_b, r_i, p, w), reference
        ctx.save_for_backward(x, rho, weight, bias, mu_i)
        ctx.mark_non_differentiable(mu_i, v_i)
        return y, mu_i, v_i

    @staticmethod
    def backward(ctx, dy: Tensor, _gm: Tensor, _gv: Tensor):  # type: ignore[override]
        x, rho, weight, bias, mu_i = ctx.saved_tensors
        need = ctx.needs_input_grad
        nones = (None,) * 4
        if torch.is_grad_enabled():  # double backward: differentiate the plain path
            return _double_backward_bin(ctx, x, rho, weight, bias, dy) + nones
        cd, layout, length = ctx.channel_dim, ctx.layout, ctx.length
        mu_b, r_b, r_i, p, w = ctx.small
        n = mu_i.shape[0]
        v = kernel_views(x, cd)[1]  # type: ignore[index]
        dyv = dy_view(dy, x, cd, layout, kernel=True)
        g, h = _kernels.reduce(dyv, v, layout, mu_i)
        big_g = g.sum(0, keepdim=True)
        big_h = (h + (mu_i - mu_b) * g).sum(0, keepdim=True)
        sum_ih = (r_i * h).sum(0, keepdim=True)
        dx = None
        if need[0]:
            a_b, a_i = w * p * r_b, w * (1 - p) * r_i
            b_coef = -a_i * r_i ** 2 / length * h
            k_coef = -a_i * g / length
            if ctx.fixed is None:  # the batch branch's statistics depend on x too
                nl = n * length
                b_coef = b_coef - a_b * r_b ** 2 * big_h / nl
                k_coef = k_coef - a_b * big_g / nl - a_b * r_b ** 2 * big_h * (mu_i - mu_b) / nl
            dx = torch.empty_like(x)
            _kernels.dx(dyv, v, kernel_views(dx, cd)[1], layout, mu_i, a_b + a_i, b_coef, k_coef)  # type: ignore[index]
        d_rho = (w * (r_b * big_h - sum_ih)).reshape(-1).to(rho.dtype) if need[1] else None
        dw = (p * r_b * big_h + (1 - p) * sum_ih).reshape(-1).to(weight.dtype) if need[2] else None
        db = big_g.reshape(-1).to(bias.dtype) if need[3] else None
        return dx, d_rho, dw, db, *nones


def _double_backward_bin(ctx, x, rho, weight, bias, dy) -> tuple:
    need = ctx.needs_input_grad[:4]
    fixed = ctx.fixed
    with torch.enable_grad(), fast_path(False):
        xs = x if x.requires_grad else x.detach().requires_grad_()
        running = (None, None) if fixed is None else (fixed[0].reshape(-1), fixed[1].reshape(-1))
        y = _reference(ctx)(xs, rho, running[0], running[1], weight, bias, training=fixed is None,
                                      momentum=None, eps=ctx.eps, channel_dim=ctx.channel_dim)
        wrt = [t for t, k in zip((xs, rho, weight, bias), need) if k]
        grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True, allow_unused=True))
    return tuple(next(grads) if k else None for k in need)
