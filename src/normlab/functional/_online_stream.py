"""Online normalization's streams, vectorized over the batch, and its fused CPU training path.

The streams of :func:`normlab.functional.online_norm` run over the samples of a batch in
order. Those with a constant coefficient (the forward mean and variance, decay
``alpha_fwd``; the backward control ``u``, decay ``alpha_bkw``) are decay-weighted cumulative
sums, computed for the whole batch at once by :func:`decayed_cumsum` (one small matrix
product); only the control ``v``, whose coefficient ``1 - (1 - alpha_bkw) mean(y_t^2)``
changes with t, keeps a loop of (C,)-vector steps.

:class:`OnlineTrain` is the training map with the full-size work in the fewest passes, in
the manner of the engine (normlab.engine), on the compiled kernels: the output (streaming normalization,
affine map and, optionally, layer scaling, whose per-sample RMS follows from the
per-(sample, channel) moments) is one per-(n, c) affine map of ``x``, so the forward is one
moment pass and one in-place pass; the backward is the paper's control process written as
``dx = P * dz + Q * (x - mu) + R`` per (n, c), from two per-(n, c) sums (one reduction pass)
and two passes for ``dx``. Only ``x`` and (N, C) statistics are saved.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _kernels
from ..engine.routing import dy_view, kernel_views

__all__ = ["OnlineTrain", "control_scan", "decayed_cumsum"]


_BLOCK = 256  # samples per block of decayed_cumsum: the (block x block) weight matrix stays small
_WEIGHTS: dict[tuple, tuple[Tensor, Tensor]] = {}
_MAX_WEIGHTS = 64


def _weights(m: int, decay: float, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """The lower-triangular (m x m) weights ``decay^(t-1-k)`` (k < t, else 0) and the (m, 1) powers
    ``decay^t`` of :func:`decayed_cumsum`, built once per (m, decay, dtype, device) and cached."""
    key = (m, decay, dtype, device)
    got = _WEIGHTS.get(key)
    if got is None:
        idx = torch.arange(m, dtype=dtype, device=device)
        e = idx[:, None] - 1 - idx[None, :]  # decay exponent t-1-k, used where k < t
        w = torch.where(e >= 0, torch.full_like(e, decay).pow(e.clamp_min(0)), torch.zeros_like(e))
        powers = torch.full((m, 1), decay, dtype=dtype, device=device).pow(idx[:, None])
        if len(_WEIGHTS) >= _MAX_WEIGHTS:
            _WEIGHTS.clear()
        got = _WEIGHTS[key] = (w, powers)
    return got


def decayed_cumsum(first: Tensor, inc: Tensor, decay: float) -> tuple[Tensor, Tensor]:
    """States of ``s_t = decay * s_{t-1} + inc[t]`` from ``s_{-1} = first``: ``(before, last)``
    with ``before[t] = s_{t-1}`` (N, C) and ``last = s_{N-1}``.

    Closed form ``s_{t-1} = decay^t first + sum_{k<t} decay^(t-1-k) inc[k]``: a lower-triangular
    (N x N) matrix product, in blocks of 256 samples carrying the state across blocks (the
    weights cached per block size, decay, dtype and device: a call is a few small operations).
    """
    n = inc.shape[0]
    outs = []
    state = first
    for start in range(0, n, _BLOCK):
        blk = inc[start:start + _BLOCK]
        w, powers = _weights(blk.shape[0], float(decay), inc.dtype, inc.device)
        before = torch.addmm(powers * state, w, blk)
        outs.append(before)
        state = torch.add(blk[-1], before[-1], alpha=decay)
    return (outs[0] if len(outs) == 1 else torch.cat(outs)), state


def control_scan(first: Tensor, inc: Tensor, coef: Tensor) -> tuple[Tensor, Tensor]:
    """States of ``s_t = coef[t] * s_{t-1} + inc[t]`` from ``s_{-1} = first`` (a coefficient that
    changes with t: online norm's control ``v``), as :func:`decayed_cumsum` returns them:
    ``(before, last)``. One fused multiply-add of (C,) rows a sample: on the compiled kernels in
    one call (:func:`normlab._kernels.linear_scan`) where they take the tensors, else a loop of
    torch ops over the samples."""
    if _kernels.scans(first, inc, coef) and inc.ndim == 2 and first.shape == inc.shape[1:]:
        return _kernels.linear_scan(first, coef, inc)
    before = []
    state = first
    for c, i in zip(coef.unbind(0), inc.unbind(0)):
        before.append(state)
        state = torch.addcmul(i, state, c)
    return torch.stack(before), state


class OnlineTrain(torch.autograd.Function):
    """Training online normalization + affine map (+ layer scaling if ``ls_eps`` is not None)
    on a channel-first or channels-last dense CPU input; see :func:`online_norm` for the
    equations. ``apply(x, weight, bias, stream_mean, stream_var, control_u, control_v,
    alpha_fwd, alpha_bkw, eps, cd, ls_eps)``; updates the stream buffers in forward and the
    control buffers in backward, in place, as the plain path does. Its (N, C) statistics math is
    float64 in every input dtype (the plain path's is float32 for half-precision inputs): the
    same equations, rounded less."""

    @staticmethod
    def forward(ctx, x, weight, bias, stream_mean, stream_var, control_u, control_v, alpha_fwd, alpha_bkw, eps, cd,
                ls_eps):
        layout, v = kernel_views(x, cd)
        n = x.shape[0]
        # the (N, C) math in float64, the moments' dtype, in every input dtype: no conversions
        # to and from the kernels (each small operation costs 10 us or more between the passes)
        mu, m2 = _kernels.moments(v, layout)  # float64 (N, C)
        work = mu.dtype
        length = v.numel() // max(mu.numel(), 1)
        var = m2 / length
        a = alpha_fwd
        means, mean_after = decayed_cumsum(stream_mean.to(work), (1 - a) * mu, a)
        delta = mu - means
        variances, var_after = decayed_cumsum(stream_var.to(work), (1 - a) * var + a * (1 - a) * delta * delta, a)
        stream_mean.copy_(mean_after)
        stream_var.copy_(var_after)
        r = torch.rsqrt(variances + eps)
        # y = r (x - means) = r (x - mu) + r delta;  z = w y + b = A (x - mu) + B0
        w = weight.to(work).reshape(1, -1) if weight is not None else None
        big_a = r * w if w is not None else r
        b0 = big_a * delta
        if bias is not None:
            b0 = b0 + bias.to(work).reshape(1, -1)
        rms = None
        if ls_eps is not None:  # mean over (C, positions) of z^2, from the moments
            rms = torch.sqrt((big_a * big_a * var + b0 * b0).mean(1, keepdim=True) + ls_eps)
            big_a, b0 = big_a / rms, b0 / rms
        out = torch.empty_like(x)
        _kernels.affine(v, kernel_views(out, cd)[1], layout, mu, big_a, b0)  # out = S (x - mu) + T0
        ctx.save_for_backward(x, weight, mu, var, r, delta, big_a, b0, rms)
        ctx.control = (control_u, control_v)
        ctx.alpha_bkw, ctx.cd, ctx.layout, ctx.length, ctx.n = alpha_bkw, cd, layout, length, n
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        x, weight, mu, var, r, delta, s, t0, rms = ctx.saved_tensors
        control_u, control_v = ctx.control
        b, cd, layout, length = 1 - ctx.alpha_bkw, ctx.cd, ctx.layout, ctx.length
        work = mu.dtype
        v = kernel_views(x, cd)[1]
        dv = dy_view(dout, x, cd, layout)
        g_sum, h_sum = _kernels.reduce(dv, v, layout, mu)  # sum(dout), sum(dout (x - mu)), float64
        if rms is not None:
            # layer scaling: dz = (dout - proj o) / rms with o = s (x - mu) + t0, proj = mean(dout o)
            proj = (s * h_sum + t0 * g_sum).mean(1, keepdim=True) / length
            alpha, beta, gamma = 1 / rms, -proj * s / rms, -proj * t0 / rms
            dz_sum = alpha * g_sum + gamma * length
            dzc_sum = alpha * h_sum + beta * length * var
        else:
            alpha, beta, gamma = torch.ones_like(r), torch.zeros_like(r), torch.zeros_like(r)
            dz_sum, dzc_sum = g_sum, h_sum
        dzy_sum = r * (dzc_sum + delta * dz_sum)  # sum(dz * y)
        grad_w = dzy_sum.sum(0).to(weight.dtype) if weight is not None else None
        grad_b = dz_sum.sum(0).to(ctx.bias_dtype) if ctx.bias_dtype is not None else None
        w = weight.to(work).reshape(1, -1) if weight is not None else torch.ones_like(r[:1])
        g_mean, gy_mean = w * dz_sum / length, w * dzy_sum / length
        yy, y_mean = (var + delta * delta) * r * r, delta * r
        # the control process (see online_norm): v has a t-dependent coefficient, u does not
        v_before, v_after = control_scan(control_v.to(work), gy_mean, 1 - b * yy)
        g2_mean = (g_mean - b * v_before * y_mean) * r
        u_before, u_after = decayed_cumsum(control_u.to(work), g2_mean, 1 - b)
        control_v.copy_(v_after)
        control_u.copy_(u_after)
        # dx = r (w dz - b v y) - b u,  dz = alpha dout + beta (x - mu) + gamma,  y = r (x - mu) + r delta
        bvr2 = b * v_before * r * r
        p_coef = r * w * alpha
        q_coef = r * w * beta - bvr2
        r_coef = r * w * gamma - bvr2 * delta - b * u_before
        dx = torch.empty_like(x)
        _kernels.dx(dv, v, kernel_views(dx, cd)[1], layout, mu, p_coef, q_coef, r_coef)
        return dx, grad_w, grad_b, None, None, None, None, None, None, None, None, None
