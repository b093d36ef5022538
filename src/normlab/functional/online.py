"""Online normalization (Chiley et al., NeurIPS 2019, arXiv:1905.05894).

Batch norm with the batch replaced by a stream: the samples of a batch are processed in
order, each normalized with per-channel statistics accumulated from the samples BEFORE it
(an exponential moving average with decay ``alpha_fwd``); the gradient is made unbiased by
the paper's control process (decay ``alpha_bkw``), a custom backward that is not the
derivative of the forward. An error-compensation step follows the affine map: layer
scaling (the paper's experiments) or activation clamping (the 2020 package's default).

The per-sample loop over the batch is inherent to the method; here it runs over
``(N, C)`` summaries only (the per-(sample, channel) moments forward; ``mean(dz)`` and
``mean(dz*y)`` backward, with ``mean(y)`` and ``mean(y^2)`` known from the forward moments),
one ``(C,)`` step per sample, and every full-size operation is vectorized over the batch,
channels and positions.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .. import _moments
from .._layout import channel_axis, per_channel, stat_dims
from ._common import affine
from ..engine import affine_eval, route
from .feature import rms_norm
from ._online_stream import OnlineTrain, control_scan, decayed_cumsum

ECMS = ("ls", "ac", None)


def _spatial_mean(t: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Mean over the positions (kept as size-1 axes); a dense input has one position."""
    return t.mean(dims, keepdim=True) if dims else t


class _OnlineNormalize(torch.autograd.Function):
    """The streaming normalization ``y_t = (x_t - mu_{t-1}) / sqrt(sigma2_{t-1} + eps)`` and the
    affine map ``z = weight * y + bias``, with the control-process backward. Updates the
    stream buffers in forward and the control buffers in backward, in place.

    The affine map lives here so that its parameter gradients come from the per-(sample,
    channel) sums the control process needs anyway (``mean(dz * y)``, ``mean(dz)``)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stream_mean, stream_var, control_u, control_v, alpha_fwd, alpha_bkw, eps, cd):
        n, c = x.shape[0], stream_mean.numel()
        dims = stat_dims(x.ndim, cd, "spatial")
        work = torch.promote_types(_moments.accumulation_dtype(x.dtype), stream_mean.dtype)
        if dims:
            mu, var = _moments.mean_var(x, dims)  # per (sample, channel), size-1 positions kept
        else:
            mu, var = x, torch.zeros_like(x)  # a dense layer: the value itself, variance 0
        shape = mu.shape
        mu, var = mu.to(work).reshape(n, c), var.to(work).reshape(n, c)
        a = alpha_fwd
        # mu_t = a mu_{t-1} + (1-a) mu(x_t): a decay-weighted cumulative sum over the batch
        means, mean_after = decayed_cumsum(stream_mean.to(work), (1 - a) * mu, a)
        delta = mu - means
        # sigma2_t = a sigma2_{t-1} + (1-a) var(x_t) + a(1-a) (mu(x_t) - mu_{t-1})^2
        fresh = (1 - a) * var + a * (1 - a) * delta * delta
        variances, var_after = decayed_cumsum(stream_var.to(work), fresh, a)
        stream_mean.copy_(mean_after)
        stream_var.copy_(var_after)
        rstd = torch.rsqrt(variances + eps)
        # mean(y_t) and mean(y_t^2) over the positions follow from the moments
        ctx.y_mean = delta * rstd
        ctx.y_sq_mean = (var + delta * delta) * rstd * rstd
        rstd = rstd.reshape(shape)
        y = torch.addcmul(-means.reshape(shape) * rstd, x.to(work), rstd).to(x.dtype)
        ctx.save_for_backward(y, rstd, weight)
        ctx.control = (control_u, control_v)
        ctx.alpha_bkw, ctx.dims, ctx.cd = alpha_bkw, dims, cd
        ctx.bias_dtype = None if bias is None else bias.dtype
        if weight is not None and bias is not None:
            return torch.addcmul(per_channel(bias, y.ndim, cd), y, per_channel(weight, y.ndim, cd)).to(x.dtype)
        if weight is not None:
            return (y * per_channel(weight, y.ndim, cd)).to(x.dtype)
        if bias is not None:
            return (y + per_channel(bias, y.ndim, cd)).to(x.dtype)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, rstd, weight = ctx.saved_tensors
        control_u, control_v = ctx.control
        b, dims = 1 - ctx.alpha_bkw, ctx.dims
        n, c, shape, work = y.shape[0], control_u.numel(), rstd.shape, rstd.dtype
        positions = y[0].numel() // c
        dz, yw = grad.to(work), y.to(work)
        dz_mean = _spatial_mean(dz, dims).reshape(n, c)
        dzy_mean = _spatial_mean(dz * yw, dims).reshape(n, c)
        grad_w = grad_b = None
        if weight is not None:
            grad_w = (dzy_mean.sum(0) * positions).to(weight.dtype)
            w = weight.to(work)
            g_mean, gy_mean = dz_mean * w, dzy_mean * w  # g = dz * weight: the gradient at y
        else:
            g_mean, gy_mean = dz_mean, dzy_mean
        if ctx.bias_dtype is not None:
            grad_b = (dz_mean.sum(0) * positions).to(ctx.bias_dtype)
        # 1. g~_t = g_t - (1-a_b) v_{t-1} y_t;  v_t = v_{t-1} + mean(g~_t y_t)
        #    i.e. v_t = v_{t-1} + mean(g_t y_t) - (1-a_b) v_{t-1} mean(y_t^2): a scan on (C,)
        yy = ctx.y_sq_mean
        v_before, v_after = control_scan(control_v.to(work), gy_mean, 1 - b * yy)
        if weight is not None:
            g_tilde = dz * per_channel(w, y.ndim, ctx.cd)
            g_tilde.addcmul_(yw, v_before.reshape(shape), value=-b)
        else:
            g_tilde = torch.addcmul(dz, yw, v_before.reshape(shape), value=-b)
        # 2. g''_t = g~_t / sqrt(sigma2_{t-1} + eps)
        # 3. dx_t = g''_t - (1-a_b) u_{t-1};  u_t = u_{t-1} + mean(dx_t) = a_b u_{t-1} + mean(g''_t)
        g2_mean = (g_mean - b * v_before * ctx.y_mean) * rstd.reshape(n, c)
        u_before, u_after = decayed_cumsum(control_u.to(work), g2_mean, 1 - b)
        dx = g_tilde.mul_(rstd).sub_(u_before.reshape(shape), alpha=b)
        control_v.copy_(v_after)
        control_u.copy_(u_after)
        return dx.to(grad.dtype), grad_w, grad_b, None, None, None, None, None, None, None, None


class _LayerScaling(torch.autograd.Function):
    """``y = x / sqrt(mean(x^2) + eps)`` per sample, backward written in ``y`` (x is freed)."""

    @staticmethod
    def forward(ctx, x, eps):
        dims = tuple(range(1, x.ndim))
        work = _moments.accumulation_dtype(x.dtype)
        count = x[0].numel()
        # sqrt(mean(x^2) + eps) from the 2-norm: one pass, no squared temporary
        norm = torch.linalg.vector_norm(x, 2, dims, keepdim=True, dtype=work)
        rms = torch.sqrt(norm * norm / count + eps)
        y = (x.to(work) / rms).to(x.dtype)
        ctx.save_for_backward(y, rms)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, rms = ctx.saved_tensors
        dims = tuple(range(1, y.ndim))
        g, yw = grad.to(rms.dtype), y.to(rms.dtype)
        proj = (g * yw).mean(dims, keepdim=True)
        return torch.addcmul(g, yw, proj, value=-1).div_(rms).to(grad.dtype), None


def layer_scaling(x: Tensor, eps: float = 1e-5) -> Tensor:
    r"""Layer scaling, online normalization's default error compensation (Chiley et al. 2019).

    Per sample, over every non-batch axis, no centring and no parameters::

        y = x / sqrt(mean_{C, positions}(x^2) + eps)
        dx = (g - mean(g * y) * y) / sqrt(mean(x^2) + eps)

    The backward is the exact gradient, written in ``y`` so that ``x`` need not be saved.
    """
    if x.ndim < 2:
        raise ValueError(f"layer_scaling: expected an input of rank >= 2 (N, ...), got shape {tuple(x.shape)}")
    return _LayerScaling.apply(x, eps)


class _ActivationClamp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bound):
        y = x.clamp(-bound, bound)
        ctx.save_for_backward(y.abs() < bound)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None


def activation_clamp(x: Tensor, bound: float = 5.0) -> Tensor:
    r"""Activation clamping (Chiley et al. 2019): ``y = clip(x, -bound, bound)``.

    The gradient is 1 strictly inside the bounds and 0 at or beyond them (the official
    code zeroes it wherever the output equals a bound; ``torch.clamp`` would pass it at
    the bound itself).
    """
    if not bound > 0:
        raise ValueError(f"activation_clamp: bound must be > 0, got {bound!r}")
    return _ActivationClamp.apply(x, float(bound))


def online_norm(
    x: Tensor,
    stream_mean: Tensor,
    stream_var: Tensor,
    control_u: Tensor | None = None,
    control_v: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = True,
    alpha_fwd: float = 0.999,
    alpha_bkw: float = 0.99,
    eps: float = 1e-5,
    ecm: str | None = "ls",
    ls_eps: float = 1e-5,
    clamp_value: float = 5.0,
    channel_dim: int = 1,
) -> Tensor:
    r"""Online normalization (Chiley, Sharapov, Kosson, Koster, Reece, Samaniego de la Fuente,
    Subbiah & James, NeurIPS 2019, arXiv:1905.05894).

    The batch is a stream of samples t = 0..N-1. Per channel, with mu(x_t) and var(x_t) the
    mean and biased variance of sample t over its positions (for a dense layer the value
    itself and 0), and a = ``alpha_fwd``::

        y_t = (x_t - mu_{t-1}) / sqrt(sigma2_{t-1} + eps)
        sigma2_t = a sigma2_{t-1} + (1 - a) var(x_t) + a (1 - a) (mu(x_t) - mu_{t-1})^2
        mu_t = a mu_{t-1} + (1 - a) mu(x_t)

    starting from ``stream_mean`` (mu_{-1}, init 0) and ``stream_var`` (sigma2_{-1}, init 1),
    which hold mu_{N-1}, sigma2_{N-1} afterwards (updated in place: the state persists
    across batches). Then ``z = weight * y + bias`` and the error compensation ``ecm``:
    ``"ls"`` layer scaling (:func:`layer_scaling`, eps ``ls_eps``), ``"ac"`` activation
    clamping at ``clamp_value`` (:func:`activation_clamp`), or None.

    Backward (training), the paper's control process on g_t, the gradient reaching y_t
    (``weight * dz``), with b = 1 - ``alpha_bkw``, per channel,
    with accumulators ``control_v`` (the component along y) and ``control_u`` (the constant
    component), both init 0, run over the samples in the same order and updated in place::

        g~_t = g_t - b v_{t-1} y_t;          v_t = v_{t-1} + mean_positions(g~_t y_t)
        dx_t = g~_t / sqrt(sigma2_{t-1} + eps) - b u_{t-1};   u_t = u_{t-1} + mean_positions(dx_t)

    This is NOT the gradient of the forward map (which treats the streamed statistics as
    constants and would give ``g_t / sqrt(sigma2_{t-1} + eps)``): it removes, with memory
    ``alpha_bkw``, the gradient components along y and along 1, the online counterpart of
    batch norm's projection, and the paper proves it unbiased. ``gradcheck`` therefore does
    not apply to it; with ``alpha_bkw = 1`` the control is off and the backward is exactly
    that stop-gradient derivative. The backward is once-differentiable.

    Eval (``training=False``): ``y = (x - mu) / sqrt(sigma2 + eps)`` with the streamed
    statistics, nothing updated, plain autograd. The output has the input's dtype. An input
    with no values (no sample, or no position) streams nothing: the output is empty and every
    buffer stays as it was.
    """
    if ecm not in ECMS:
        raise ValueError(f"online_norm: ecm must be 'ls', 'ac' or None, got {ecm!r}")
    cd = channel_axis(x.ndim, channel_dim)
    if x.numel() == 0:  # no sample, or no position: nothing to stream, the statistics stay as they are
        return affine(x, weight, bias, cd).to(x.dtype)
    if training:
        if control_u is None or control_v is None:
            raise ValueError("online_norm: training needs the control buffers control_u and control_v")
        if route("on", x, cd) == "kernels":  # the compiled kernels, layer scaling folded in
            z = OnlineTrain.apply(x, weight, bias, stream_mean, stream_var, control_u, control_v, float(alpha_fwd),
                                  float(alpha_bkw), float(eps), cd, float(ls_eps) if ecm == "ls" else None)
            return activation_clamp(z, clamp_value) if ecm == "ac" else z
        z = _OnlineNormalize.apply(x, weight, bias, stream_mean, stream_var, control_u, control_v,
                                   float(alpha_fwd), float(alpha_bkw), float(eps), cd)
    else:  # the same map, in one pass where the kernels take it
        fast = route("on", x, cd) == "kernels" and stream_mean.dtype == x.dtype and stream_var.dtype == x.dtype
        z = affine_eval(x, cd, stream_mean, stream_var, eps, weight, bias) if fast else None
    if not training and z is None:
        work = torch.promote_types(_moments.accumulation_dtype(x.dtype), stream_mean.dtype)
        mean = per_channel(stream_mean, x.ndim, cd).to(work)
        rstd = torch.rsqrt(per_channel(stream_var, x.ndim, cd).to(work) + eps)
        z = affine(((x.to(work) - mean) * rstd).to(x.dtype), weight, bias, cd).to(x.dtype)  # (float32 weight)
    if ecm == "ls" and not training:  # layer scaling is the per-sample RMS norm: its fused pass
        return rms_norm(z, None, eps=ls_eps, channel_dim=cd)
    if ecm == "ls":
        return layer_scaling(z, ls_eps)
    if ecm == "ac":
        return activation_clamp(z, clamp_value)
    return z
