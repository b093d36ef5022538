"""Fast CPU paths of the per-channel batch-statistic norms, on torch's batch-norm kernels.

Batch norm, batch renorm and mean-only batch norm normalize with one (mean, var) per
channel, so torch's own batch-norm kernels (vectorised for contiguous and channels-last
input) do their full-size work once they are handed the statistics:

forward   per-channel moments in one vectorised pass (:func:`channel_moments_spare`: Welford
          per (n, c) merged exactly, which also writes ``x_hat`` per (n, c); or the two-pass
          channels-last kernel), then the eval kernel
          ``y = (x - mean) * weight / sqrt(var + eps) + bias`` (channel-first: in place on
          ``x_hat``, re-scaled per (n, c));
backward  torch's training batch-norm backward given the saved mean and 1/std (one fused
          reduction of ``dy`` and ``dy * x``, one pass writing ``dx``).

Only ``x`` and per-channel statistics are saved. Batch renorm is batch norm with weight
``weight * r`` and bias ``weight * d + bias`` (r and d are constants of the backward), so it
runs through :class:`BatchNormTrain` with autograd handling the tiny (C,) products. Mean-only
batch norm needs neither ``x`` nor a variance: ``dx = dy - mean_c(dy)``.

Any channel axis works: the input is viewed (no copy) as ``(N, C, L)`` when the channel
axis is outside the positions in memory (channel-first) or as ``(N * L, C)`` when it is the
innermost axis (channels-last; torch's kernels treat an ``(M, C)`` matrix as channels-last).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import _kernels
from .._moments import Moments, accumulation_dtype, reduce_moments
from ._fused import _moments_nc, _scale_shift_into
from ._routing import MIN_KERNEL_NUMEL, _views, dy_view, fast_layout, is_half, kernels_for

__all__ = ["BatchNormKernel", "BatchNormTrain", "InstanceNormChannelsLast", "MeanOnlyTrain", "batch_moments_fast",
           "batch_norm_train", "bn_view", "channel_moments", "channel_moments_spare"]


def bn_view(x: Tensor, cd: int) -> tuple[Tensor, Callable[[Tensor], Tensor]] | None:
    """``(xb, back)``: a view of ``x`` with the channel axis at 1 that torch's batch-norm
    kernels run on without a copy, and the map taking a result of ``xb``'s shape back to
    ``x``'s; None where the fused path does not apply (see :func:`fast_layout`)."""
    layout = fast_layout(x, cd, half=True)
    if layout is None:
        return None
    _, v = _views(x, cd)  # type: ignore[misc]
    if layout == "cf" and v.shape[2] != 1:
        shape = x.movedim(cd, 1).shape
        return v, lambda t: t.view(shape).movedim(1, cd)
    shape = x.movedim(cd, -1).shape  # channels innermost (or no positions): an (M, C) matrix
    return v.reshape(-1, x.shape[cd]), lambda t: t.view(shape).movedim(-1, cd)


@torch.no_grad()
def channel_moments_spare(xb: Tensor) -> tuple[Moments, tuple[Tensor, Tensor, Tensor] | None]:
    """Per-channel moments of a :func:`bn_view` (``(N, C, L)`` or ``(M, C)``), shaped (C,), and
    for ``(N, C, L)`` the spare output of the moment pass, ``(x_hat, mean_nc, rstd0)`` with
    ``x_hat = (x - mean_nc) * rstd0`` per (n, c), into which :class:`BatchNormTrain` writes ``y``."""
    if xb.ndim == 3:
        mean, var, count, buf, rstd0 = _moments_nc(xb, "cf", per_channel=False)
        r = reduce_moments(Moments(count, mean, var * count), 0)
        return Moments(r.count, r.mean.reshape(-1), r.m2.reshape(-1)), (buf, mean, rstd0)  # type: ignore[return-value]
    mean, var = torch.ops.aten.batch_norm_update_stats(xb, None, None, 0.0)
    return Moments(xb.shape[0], mean, var * xb.shape[0]), None


def _use_kernels(xb: Tensor, process_group) -> bool:
    """Batch norm on the compiled kernels: for channel-first views from MIN_KERNEL_NUMEL values
    on, whenever synchronized (torch's kernels cannot take a global batch) and in half precision. An (M, C)
    view (channels-last, or no positions) otherwise stays on torch's kernels, whose
    channels-last batch norm is as fast (measured)."""
    if process_group is not None or is_half(xb):
        return _kernels.supports(xb.dtype)
    return xb.ndim == 3 and kernels_for(xb, MIN_KERNEL_NUMEL)


def kernel_view(xb: Tensor) -> tuple[Tensor, str]:
    """A :func:`bn_view` as the compiled kernels' 3-d view: (N, C, L) "cf", or (M, C) as (1, M, C) "cl"."""
    return (xb, "cf") if xb.ndim == 3 else (xb.unsqueeze(0), "cl")


@torch.no_grad()
def batch_moments_fast(xb: Tensor, process_group=None, stat_shape: tuple[int, ...] | None = None
                       ) -> tuple[Moments, tuple[Tensor, Tensor, Tensor] | None]:
    """Per-channel moments ((C,) mean and M2) of a :func:`bn_view`, and the spare output
    :func:`batch_norm_train` may reuse.

    On the compiled kernels (float64 moments, no spare) the moments can be synchronized over
    ``process_group``: one all-gather of ``(count, mean, M2)`` shaped ``stat_shape`` in the
    accumulation dtype, the same message the plain path's differentiable all-gather sends (so
    ranks on either path interoperate). Without the kernels ``process_group`` must be None.
    """
    if not _use_kernels(xb, process_group):
        if process_group is not None:
            raise RuntimeError("batch_moments_fast: synchronized statistics need the compiled kernels")
        return channel_moments_spare(xb)
    v, layout = kernel_view(xb)
    mean_nc, m2_nc = _kernels.moments(v, layout)
    # the exact merge over samples (equal counts): mean of means, M2 plus the spread of the means
    length = xb.numel() // (mean_nc.numel() or 1)
    mean = mean_nc.mean(0)
    m = Moments(length * mean_nc.shape[0], mean, m2_nc.sum(0) + length * ((mean_nc - mean) ** 2).sum(0))
    if process_group is not None:
        from .. import distributed

        acc = accumulation_dtype(xb.dtype)
        shape = stat_shape or (-1,)
        g = distributed.all_reduce_moments(Moments(m.count, m.mean.to(acc).reshape(shape), m.m2.to(acc).reshape(shape)),
                                           process_group)
        count = g.count.reshape(-1)[0].item() if isinstance(g.count, Tensor) else g.count
        m = Moments(count, g.mean.reshape(-1).double(), g.m2.reshape(-1).double())
    return m, None


def batch_norm_train(xb: Tensor, weight: Tensor | None, bias: Tensor | None, m: Moments, eps: float,
                     spare: tuple[Tensor, Tensor, Tensor] | None = None, process_group=None,
                     stat_shape: tuple[int, ...] | None = None) -> Tensor:
    """Training batch norm of a :func:`bn_view` given its moments from :func:`batch_moments_fast`:
    on the compiled kernels (:class:`BatchNormKernel`) or torch's (:class:`BatchNormTrain`)."""
    if _use_kernels(xb, process_group):
        v, layout = kernel_view(xb)
        y = BatchNormKernel.apply(v, weight, bias, m.mean, m.var, eps, float(m.count), layout,
                                  process_group, stat_shape)
        return y.view(xb.shape)
    return BatchNormTrain.apply(xb, weight, bias, m.mean, m.var, eps, spare)


def channel_moments(xb: Tensor) -> Moments:
    """Per-channel moments of a :func:`bn_view` (``(N, C, L)`` or ``(M, C)``), shaped (C,)."""
    return channel_moments_spare(xb)[0]


class BatchNormTrain(torch.autograd.Function):
    """Training batch norm of a :func:`bn_view` with its batch moments given.

    ``apply(xb, weight, bias, mean, var, eps)``: ``mean`` and the biased ``var`` (C,) must be
    the moments of ``xb`` over every axis but 1 (from :func:`channel_moments`); the backward
    is the full batch-norm gradient, through the statistics too. ``weight`` and ``bias`` may
    be None or any differentiable (C,) tensors.
    """

    @staticmethod
    def forward(ctx, xb: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,  # type: ignore[override]
                eps: float, spare: tuple[Tensor, Tensor, Tensor] | None = None) -> Tensor:
        if spare is None:
            y = torch.ops.aten._native_batch_norm_legit_no_training(xb, weight, bias, mean, var, 0.0, eps)[0]
        else:  # y = a (x - mean) + bias = (a / rstd0) x_hat + a (mean_nc - mean) + bias, in place on x_hat
            y, mean_nc, rstd0 = spare
            a = torch.rsqrt(var + eps) if weight is None else torch.rsqrt(var + eps) * weight
            shift = a * (mean_nc - mean)
            _scale_shift_into(y, y, a / rstd0, shift if bias is None else shift + bias, "cf")
        ctx.eps = eps
        ctx.save_for_backward(xb, weight, bias, mean, torch.rsqrt(var + eps))
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        xb, weight, bias, mean, invstd = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: differentiate torch's own batch norm
            with torch.enable_grad():
                xs = xb if xb.requires_grad else xb.detach().requires_grad_()
                y = torch.nn.functional.batch_norm(xs, None, None, weight, bias, True, 0.0, ctx.eps)
                wrt = [t for t, n in zip((xs, weight, bias), need) if n]
                grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
            return tuple(next(grads) if n else None for n in need) + (None, None, None, None)
        dx, dw, db = torch.ops.aten.native_batch_norm_backward(dy.contiguous(), xb, weight, None, None, mean, invstd,
                                                               True, ctx.eps, list(need))
        return dx, dw, db, None, None, None, None


class BatchNormKernel(torch.autograd.Function):
    """Training batch norm on normlab's compiled kernels, its batch moments given.

    ``apply(v, weight, bias, mean, var, eps, count, layout, process_group, stat_shape)``:
    ``v`` is the kernels' 3-d view ("cf" (N, C, L) or "cl" (N, L, C)); ``mean`` and the
    biased ``var`` (C,) are the moments of the (global, if synchronized) batch of ``count``
    values per channel. Forward, one pass: ``y = (x - mean) * weight * rstd + bias``.
    Backward: one fused reduction (per channel ``g = sum dy``, ``h = sum dy (x - mean)``)
    and one pass::

        dx = weight * rstd * (dy - g / count - (x - mean) * rstd^2 * h / count)
        dweight = h * rstd,   dbias = g

    Synchronized (``process_group`` given), the gradients of the loss with respect to the
    global mean and M2 are all-reduced (the same message as the plain path's), so ``g`` and
    ``h`` in ``dx`` are those of the global batch; ``dweight`` and ``dbias`` stay local, for
    DDP to average. Saves ``x`` and (C,) statistics.
    """

    @staticmethod
    def forward(ctx, v: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,  # type: ignore[override]
                eps: float, count: float, layout: str, process_group, stat_shape) -> Tensor:
        rstd = torch.rsqrt(var + eps)
        scale = rstd if weight is None else rstd * weight.detach()
        shift = torch.zeros_like(rstd) if bias is None else bias.detach()
        y = torch.empty_like(v)
        _kernels.affine(v, y, layout, mean, scale, shift)
        ctx.eps, ctx.count, ctx.layout, ctx.group, ctx.stat_shape = eps, count, layout, process_group, stat_shape
        ctx.save_for_backward(v, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        v, weight, bias, mean, rstd = ctx.saved_tensors
        need = ctx.needs_input_grad[:3]
        nones = (None,) * 7
        if torch.is_grad_enabled():  # double backward: differentiate torch's own batch norm
            if ctx.group is not None:
                raise NotImplementedError("double backward through synchronized batch norm: run it under "
                                          "normlab.functional.fast_path(False)")
            with torch.enable_grad():
                xs = v if v.requires_grad else v.detach().requires_grad_()
                cm = 1 if ctx.layout == "cf" else -1
                y = torch.nn.functional.batch_norm(xs.movedim(cm, 1), None, None, weight, bias, True, 0.0, ctx.eps)
                wrt = [t for t, n in zip((xs, weight, bias), need) if n]
                grads = iter(torch.autograd.grad(y.movedim(1, cm), wrt, dy, create_graph=True))
            return tuple(next(grads) if n else None for n in need) + nones
        dy = dy if dy.is_contiguous() else dy.contiguous()
        g_nc, h_nc = _kernels.reduce(dy, v, ctx.layout, mean)
        g, h = g_nc.sum(0), h_nc.sum(0)
        w = torch.ones_like(rstd) if weight is None else weight.detach().to(rstd.dtype)
        dx = None
        if need[0]:
            # gradients of the loss with respect to the batch mean and M2 (var = M2 / count)
            g_mean, g_m2 = -w * rstd * g, -0.5 * w * rstd ** 3 * h / ctx.count
            if ctx.group is not None:
                from ..distributed import all_reduce_moment_grads

                g_mean, g_m2 = all_reduce_moment_grads(g_mean, g_m2, ctx.group, ctx.stat_shape, v.dtype)
            dx = torch.empty_like(v)
            _kernels.dx(dy, v, dx, ctx.layout, mean, w * rstd, 2.0 * g_m2, g_mean / ctx.count)
        dw = (h * rstd).to(weight.dtype) if need[1] else None
        db = g.to(bias.dtype) if need[2] else None
        return (dx, dw, db) + nones


def _channel_sum(t: Tensor) -> Tensor:
    """Per-channel sum of an ``(N, C, L)`` or ``(M, C)`` tensor, as (C,)."""
    return t.sum(2).sum(0) if t.ndim == 3 else t.sum(0)


class MeanOnlyTrain(torch.autograd.Function):
    """``y = xb - mean_c + bias`` with ``mean`` the per-channel batch mean of ``xb`` (given).

    Backward ``dx = dy - mean_c(dy)``, ``dbias = sum_c(dy)``: one reduction and one pass,
    nothing input-sized saved. ``apply(xb, bias, mean)``.
    """

    @staticmethod
    def forward(ctx, xb: Tensor, bias: Tensor | None, mean: Tensor) -> Tensor:  # type: ignore[override]
        ones = torch.ones_like(mean)
        ctx.count, ctx.bias_dtype = xb.numel() // xb.shape[1], None if bias is None else bias.dtype
        if is_half(xb):  # the compiled kernels: x's type in and out, float32 arithmetic
            v, layout = kernel_view(xb)
            y = torch.empty_like(v)
            _kernels.affine(v, y, layout, mean, ones, torch.zeros_like(mean) if bias is None else bias)
            return y.view(xb.shape)
        # (x - mean) * rsqrt(1 + 0) + bias: the eval kernel, exact (rsqrt(1) = 1)
        return torch.ops.aten._native_batch_norm_legit_no_training(xb, None, bias, mean, ones, 0.0, 0.0)[0]

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        if torch.is_grad_enabled():  # double backward: the same linear map, differentiably
            dims = (0, 2) if dy.ndim == 3 else (0,)
            dx = dy - dy.mean(dims, keepdim=True)
            return dx, dy.sum(dims) if ctx.needs_input_grad[1] else None, None
        if is_half(dy):  # per-(n, c) sums and dx = dy - mean_c(dy) on the compiled kernels
            d, layout = kernel_view(dy if dy.is_contiguous() else dy.contiguous())
            nc = d.shape[1] if layout == "cf" else d.shape[2]
            zeros = torch.zeros(nc, dtype=torch.float64)
            g = _kernels.reduce(d, d, layout, zeros)[0].sum(0)
            dx = None
            if ctx.needs_input_grad[0]:
                dx = torch.empty_like(d)
                _kernels.dx(d, d, dx, layout, zeros, torch.ones_like(zeros), zeros, -g / ctx.count)
                dx = dx.view(dy.shape)
            return dx, g.to(ctx.bias_dtype) if ctx.needs_input_grad[1] else None, None
        g = _channel_sum(dy)
        dx = None
        if ctx.needs_input_grad[0]:
            mean_dy = g / ctx.count
            dx = torch.ops.aten._native_batch_norm_legit_no_training(dy.contiguous(), None, None, mean_dy,
                                                                     torch.ones_like(mean_dy), 0.0, 0.0)[0]
        return dx, g if ctx.needs_input_grad[1] else None, None


class InstanceNormChannelsLast(torch.autograd.Function):
    """Instance norm (one group per channel) of a channels-last tensor, per sample on torch's
    training batch-norm kernels.

    Sample ``n`` of the ``(N, L, C)`` view is an ``(L, C)`` matrix, which torch's batch-norm
    kernels treat as channels-last (vectorised along C); its per-channel statistics are the
    per-(n, c) statistics of instance norm. Forward: per sample, the two-pass statistics and
    ``y = weight * (x - mean) * rstd + bias`` written straight into the output (the second
    statistics pass and the normalizing pass read the sample from cache). Backward: per
    sample, torch's training backward (its ``dx``, ``sum(dy * x_hat)`` and ``sum(dy)``)
    written straight into ``dx``. Nothing input-sized is allocated but ``y`` and ``dx``;
    ``x`` and the (N, C) mean and 1/std are saved. ``apply(x, weight, bias, eps, channel_dim)``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float,  # type: ignore[override]
                channel_dim: int) -> Tensor:
        v = _views(x, channel_dim)[1]  # type: ignore[index]
        n, c = v.shape[0], v.shape[2]
        y = torch.empty_like(x)
        yv = _views(y, channel_dim)[1]  # type: ignore[index]
        mean, rstd = x.new_empty(n, c), x.new_empty(n, c)
        for i in range(n):
            torch.ops.aten.native_batch_norm.out(v[i], weight, bias, None, None, True, 0.0, eps, out=yv[i],
                                                 save_mean=mean[i], save_invstd=rstd[i])
        ctx.eps, ctx.channel_dim = eps, channel_dim
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        x, weight, bias, mean, rstd = ctx.saved_tensors
        cd = ctx.channel_dim
        need = ctx.needs_input_grad[:3]
        if torch.is_grad_enabled():  # double backward: differentiate torch's own group norm
            with torch.enable_grad():
                xs = x if x.requires_grad else x.detach().requires_grad_()
                c = x.shape[cd]
                y = torch.nn.functional.group_norm(xs.movedim(cd, 1), c, weight, bias, ctx.eps).movedim(1, cd)
                wrt = [t for t, k in zip((xs, weight, bias), need) if k]
                grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
            return tuple(next(grads) if k else None for k in need) + (None, None)
        v = _views(x, cd)[1]  # type: ignore[index]
        dyv = dy_view(dy, x, cd, "cl")
        n, c = v.shape[0], v.shape[2]
        dx = torch.empty_like(x)
        dxv = _views(dx, cd)[1]  # type: ignore[index]
        dw, db = x.new_empty(n, c), x.new_empty(n, c)
        for i in range(n):
            torch.ops.aten.native_batch_norm_backward.out(dyv[i], v[i], weight, None, None, mean[i], rstd[i], True,
                                                          ctx.eps, [True, True, True], out0=dxv[i], out1=dw[i],
                                                          out2=db[i])
        return (dx if need[0] else None, dw.sum(0) if need[1] else None, db.sum(0) if need[2] else None, None, None)
