"""Fast CPU entry points of the batch, per-sample and mixed norms, on :mod:`._fused` and
:mod:`._fused_bn`.

Each returns the normalized tensor (the mixed norms: with the batch moments, for the caller's
running-statistics rule), or ``None`` when the fast path does not apply (CUDA, half
precision, strides that are neither channel-first nor channels-last dense,
``torch.compile``, an empty or small input, see :func:`._fused.fast_layout`); the public
functions then take their plain autograd path, which stays the reference. Running
statistics are updated exactly as the plain path does (from the same batch moments, merged
exactly). Synchronized statistics (a process group with more than one process, see
:func:`local_only`) take the plain path, whose all-gather is differentiable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _moments
from .._layout import channel_axis
from .._moments import Moments
from ._fused import fused_affine_norm, merged, scale_shift, standard_stat_fn
from .. import _kernels
from ._routing import (MIN_FUSED_NUMEL, MIN_KERNEL_GROUP_NUMEL, MIN_KERNEL_NUMEL, fast_layout, forced, is_half,
                       kernel_views, kernels_for)
from ._fused_group import group_norm_kernel
from .frozen import frozen_batch_norm
from ._fused_mixed import BatchInstanceKernel, SwitchableKernel
from ._fused_bn import (InstanceNormChannelsLast, MeanOnlyTrain, batch_moments_fast, batch_norm_train, bn_view,
                        kernel_view)

__all__ = ["batch_instance_norm_fast", "batch_norm_fast", "group_norm_fast", "instance_norm_fast", "layer_norm_fast",
           "local_only", "mean_only_batch_norm_fast", "stat_shape", "sync_group", "rms_norm_fast", "switchable_norm_fast"]


def local_only(process_group) -> bool:
    """True if batch statistics stay local: no group, or one that is not active (torch.distributed
    not initialized, or a group of one process), where the all-reduce would return them unchanged."""
    if process_group is None:
        return True
    from .. import distributed

    return not distributed.is_active(process_group)


def _update(running_mean: Tensor | None, running_var: Tensor | None, m: Moments, momentum) -> None:
    if momentum is not None and (running_mean is not None or running_var is not None):
        _moments.update_running_stats(running_mean, running_var, m, momentum)


def affine_eval(x: Tensor, cd: int, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None,
                bias: Tensor | None) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with per-channel constants, one pass."""
    if is_half(x):  # compiled kernels: read and write x's type, float32 arithmetic
        scale = torch.rsqrt(var.double() + eps)
        scale = scale if weight is None else scale * weight.double()
        y = torch.empty_like(x)
        layout, v = kernel_views(x, cd)  # type: ignore[misc]
        _kernels.affine(v, kernel_views(y, cd)[1], layout, mean, scale,  # type: ignore[index]
                        torch.zeros_like(scale) if bias is None else bias)
        return y
    if cd == 1 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
    return frozen_batch_norm(x, mean, var, weight, bias, eps=eps, channel_dim=cd)  # one addcmul


def dtypes_of(*tensors: Tensor | None) -> tuple:
    """The dtypes of parameters and buffers (None where absent), for :func:`._routing.route`."""
    return tuple(None if t is None else t.dtype for t in tensors)


def torch_batch_norm(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                     bias: Tensor | None, training: bool, momentum, eps: float, channel_dim: int) -> Tensor:
    """Batch norm as one call of torch's own kernel (the "torch" route: small inputs, where the
    call itself is the cost). The same rule as the plain path: batch statistics in training or
    without running ones, folded into the running buffers when training with a momentum."""
    cd = channel_axis(x.ndim, channel_dim)
    batch = training or running_mean is None or running_var is None
    keep = not batch or (training and momentum is not None)
    xm = x if cd == 1 else x.movedim(cd, 1)
    y = torch.batch_norm(xm, weight, bias, running_mean if keep else None, running_var if keep else None, batch,
                         0.0 if momentum is None else momentum, eps, False)
    return y if cd == 1 else y.movedim(1, cd)


def torch_group_norm(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                     channel_dim: int) -> Tensor:
    """Group norm (layer norm: one group; instance norm: one per channel) as one call of torch's
    own kernel (the "torch" route)."""
    cd = channel_axis(x.ndim, channel_dim)
    if cd == 1:
        return F.group_norm(x, num_groups, weight, bias, eps)
    return F.group_norm(x.movedim(cd, 1), num_groups, weight, bias, eps).movedim(1, cd)


def sync_group(process_group, x: Tensor):
    """The group to synchronize over (None: local statistics), or False if this call must take
    the plain path (a synchronized call where the compiled kernels do not run)."""
    if local_only(process_group):
        return None
    return process_group if kernels_for(x, MIN_KERNEL_NUMEL) else False  # (then the kernels run it)


MIN_KERNEL_POSITIONS = 16
"""The per-(sample, channel) kernels (group, instance, layer, RMS, switchable, batch-instance
norm) need this many positions per (n, c): with fewer (an (N, C) input has one), their
per-(n, c) statistics are as large as the input and the small float64 work around the kernels
is no longer small; those inputs take the other paths."""


def _positions_ok(x: Tensor, cd: int) -> bool:
    """Enough positions per (n, c) for any per-(n, c) fast path (the kernels', or torch's
    group-norm and fused ones: with one position their statistics are input-sized, and plain
    autograd is faster; measured on (256, 4096): sn 9 vs 64 ms, rms 1.8 vs 36 ms, ln 2.7 vs 3.8)."""
    return forced() or x.numel() // max(x.shape[0] * x.shape[cd], 1) >= MIN_KERNEL_POSITIONS


def _per_nc_kernels(x: Tensor, cd: int, min_numel: int = 0) -> bool:
    """Whether a per-(n, c) norm of ``x`` runs on the compiled kernels."""
    return _positions_ok(x, cd) and kernels_for(x, min_numel) and fast_layout(x, cd, half=True) is not None


def stat_shape(ndim: int, cd: int, c: int) -> tuple[int, ...]:
    """The shape of per-channel statistics kept broadcastable (the plain path's message shape)."""
    shape = [1] * ndim
    shape[cd] = c
    return tuple(shape)


def batch_norm_fast(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                    bias: Tensor | None, training: bool, momentum, eps: float, channel_dim: int,
                    process_group=None) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    if training or running_mean is None or running_var is None:
        group = sync_group(process_group, x)
        got = bn_view(x, cd) if group is not False else None
        if got is None:
            return None
        xb, back = got
        shape = stat_shape(x.ndim, cd, x.shape[cd])
        m, spare = batch_moments_fast(xb, group, shape)
        y = back(batch_norm_train(xb, weight, bias, m, eps, spare, group, shape))
        if training:
            _update(running_mean, running_var, m, momentum)
        return y
    if fast_layout(x, cd, half=True) is None:
        return None
    return affine_eval(x, cd, running_mean, running_var, eps, weight, bias)


def mean_only_batch_norm_fast(x: Tensor, running_mean: Tensor | None, bias: Tensor | None, training: bool, momentum,
                              channel_dim: int) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    if training or running_mean is None:
        got = bn_view(x, cd)
        if got is None:
            return None
        xb, back = got
        count = xb.numel() // xb.shape[1]
        with torch.no_grad():
            if is_half(xb):  # per-(n, c) means on the compiled kernels (float32 sums), merged
                v, layout = kernel_view(xb)
                mean = _kernels.moments(v, layout)[0].mean(0)
            else:
                mean = (xb.sum(2).sum(0) if xb.ndim == 3 else xb.sum(0)) / count
        y = back(MeanOnlyTrain.apply(xb, bias, mean))
        if training:
            _update(running_mean, None, Moments(count, mean, torch.zeros_like(mean)), momentum)
        return y
    if fast_layout(x, cd, half=True) is None:
        return None
    # x - mean + bias: the eval map with variance 1 and eps 0 (exact: rsqrt(1) = 1)
    return affine_eval(x, cd, running_mean, torch.ones_like(running_mean), 0.0, None, bias)


def layer_norm_fast(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channel_dim: int) -> Tensor | None:
    return group_norm_fast(x, 1, weight, bias, eps, channel_dim)


def group_norm_fast(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                    channel_dim: int) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    layout = fast_layout(x, cd, half=True)
    if layout is None or not _positions_ok(x, cd) or x.numel() // (x.shape[0] * num_groups) == 1:
        return None  # (one value per group: the output is exactly 0, the plain path gives it)
    if is_half(x):
        return group_norm_kernel(x, cd, num_groups, eps, True, weight, bias)[0]
    # channel-first, torch's group-norm kernels are as fast unless the input outgrows the cache,
    # and the one-pass kernels need a few (sample, group) work items a thread
    cf_kernels = x.numel() >= MIN_KERNEL_GROUP_NUMEL and x.shape[0] * num_groups >= 2 * torch.get_num_threads()
    if _per_nc_kernels(x, cd, 0 if layout == "cl" or cf_kernels else 1 << 62):  # (1 << 62: only when forced)
        # compiled kernels: moments and output in one pass per (sample, group) block from cache,
        # and the same for the closed-form backward
        return group_norm_kernel(x, cd, num_groups, eps, True, weight, bias)[0]
    if layout == "cl" and fast_layout(x, cd, MIN_FUSED_NUMEL) is None:
        return None
    if layout == "cf":
        # torch's own kernel: one vectorised Welford pass forward, one fused backward
        if cd == 1:  # (no movedim: each one is an autograd node)
            return F.group_norm(x, num_groups, weight, bias, eps)
        return F.group_norm(x.movedim(cd, 1), num_groups, weight, bias, eps).movedim(1, cd)
    over = "sample" if num_groups == 1 else "spatial" if num_groups == x.shape[cd] else "group"
    if over == "spatial" and x.ndim > 2 and all(p is None or p.dtype == x.dtype for p in (weight, bias)):
        # instance norm: per sample on torch's channels-last batch-norm kernels, straight into y and dx
        return InstanceNormChannelsLast.apply(x, weight, bias, eps, cd)
    return fused_affine_norm(x, cd, standard_stat_fn(over, eps, num_groups), (weight, bias))[0]


def instance_norm_fast(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                       running_var: Tensor | None, momentum, eps: float, channel_dim: int) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    tracking = momentum is not None and (running_mean is not None or running_var is not None)
    if not tracking:
        return group_norm_fast(x, x.shape[cd], weight, bias, eps, channel_dim)
    if _per_nc_kernels(x, cd):
        y, mean, var = group_norm_kernel(x, cd, x.shape[cd], eps, True, weight, bias, need_moments=True)
        count = x.numel() // max(mean.numel(), 1)
        _update(running_mean, running_var, Moments(count, mean.mean(0), (var * count).mean(0)), momentum)
        return y
    if fast_layout(x, cd, MIN_FUSED_NUMEL) is None or not _positions_ok(x, cd):
        return None
    y, m = fused_affine_norm(x, cd, standard_stat_fn("spatial", eps), (weight, bias))
    # batch average of the per-instance moments (the mean of unbiased variances), as the plain path
    _update(running_mean, running_var, Moments(m.count, m.mean.mean(0), m.m2.mean(0)), momentum)
    return y


def rms_norm_fast(x: Tensor, weight: Tensor | None, eps: float, channel_dim: int) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    if _per_nc_kernels(x, cd):
        return group_norm_kernel(x, cd, 1, eps, False, weight, None)[0]
    if fast_layout(x, cd, MIN_FUSED_NUMEL) is None or not _positions_ok(x, cd):
        return None
    return fused_affine_norm(x, cd, standard_stat_fn("sample", eps, center=False), (weight, None))[0]



def _fixed(running_mean: Tensor | None, running_var: Tensor | None, batch_stats: bool) -> tuple[Tensor, Tensor] | None:
    """The running statistics as (1, C) rows, copied (the backward reruns the statistics
    function, and the buffers may change in place before it), or None for batch statistics."""
    if batch_stats:
        return None
    return running_mean.detach().reshape(1, -1).clone(), running_var.detach().reshape(1, -1).clone()  # type: ignore[union-attr]


def _batch_part(m: Moments, fixed: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor]:
    """(mean, biased var) of the batch part, (1, C): merged from the per-(n, c) moments, or the running ones."""
    if fixed is None:
        b = merged(m, "batch")
        return b.mean, b.var
    return fixed[0].to(m.mean.dtype), fixed[1].to(m.mean.dtype)


def _affine(scale: Tensor, shift: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
    """``weight * (scale * x + shift) + bias`` as one (scale, shift) pair."""
    if weight is not None:
        w = weight.reshape(1, -1)
        scale, shift = scale * w, shift * w
    if bias is not None:
        shift = shift + bias.reshape(1, -1)
    return scale, shift


def batch_instance_norm_fast(x: Tensor, rho: Tensor, running_mean: Tensor | None, running_var: Tensor | None,
                             weight: Tensor | None, bias: Tensor | None, batch_stats: bool, eps: float,
                             channel_dim: int, reference=None) -> tuple[Tensor, Moments | None] | None:
    """Batch-instance norm: ``(y, per-channel batch moments or None)``. ``batch_stats``: the BN
    branch uses the batch's moments (else the running ones); ``reference``: the public function,
    whose plain path a double backward differentiates."""
    cd = channel_axis(x.ndim, channel_dim)
    if _per_nc_kernels(x, cd):
        # compiled kernels and the statistics function differentiated by hand
        fixed = _fixed(running_mean, running_var, batch_stats)
        fixed = None if fixed is None else (fixed[0].double(), fixed[1].double())
        y, mean, var = BatchInstanceKernel.apply(x, rho, weight, bias, cd, eps, fixed, reference)
        count = x.numel() // max(mean.numel(), 1)
        return y, (merged(Moments(count, mean, var * count), "batch") if batch_stats else None)
    if fast_layout(x, cd, MIN_FUSED_NUMEL) is None or not _positions_ok(x, cd):
        return None
    fixed = _fixed(running_mean, running_var, batch_stats)

    def fn(m: Moments, rho: Tensor, weight: Tensor | None, bias: Tensor | None) -> tuple[Tensor, Tensor]:
        mu_bn, var_bn = _batch_part(m, fixed)
        rho = rho.reshape(1, -1).to(m.mean.dtype)
        # rho * (x - mu_BN) * rstd_BN + (1 - rho) * (x - mu_IN) * rstd_IN
        a_bn, a_in = rho * torch.rsqrt(var_bn + eps), (1 - rho) * torch.rsqrt(m.var + eps)
        return _affine(a_bn + a_in, -(a_bn * mu_bn + a_in * m.mean), weight, bias)

    y, m = fused_affine_norm(x, cd, fn, (rho, weight, bias))
    return y, (merged(m, "batch") if batch_stats else None)


def switchable_norm_fast(x: Tensor, mean_weight: Tensor, var_weight: Tensor, running_mean: Tensor | None,
                         running_var: Tensor | None, weight: Tensor | None, bias: Tensor | None, batch_stats: bool,
                         eps: float, channel_dim: int, reference=None) -> tuple[Tensor, Moments | None] | None:
    """Switchable norm: ``(y, per-channel batch moments or None)`` (``batch_stats`` as above).
    An input without positions mixes the layer and batch moments only."""
    cd = channel_axis(x.ndim, channel_dim)
    if _per_nc_kernels(x, cd):
        # compiled kernels and the statistics function differentiated by hand
        fixed = _fixed(running_mean, running_var, batch_stats)
        fixed = None if fixed is None else (fixed[0].double(), fixed[1].double())
        y, mean, var = SwitchableKernel.apply(x, mean_weight, var_weight, weight, bias, cd, eps, fixed, reference)
        count = x.numel() // max(mean.numel(), 1)
        return y, (merged(Moments(count, mean, var * count), "batch") if batch_stats else None)
    if fast_layout(x, cd, MIN_FUSED_NUMEL) is None or not _positions_ok(x, cd):
        return None
    fixed = _fixed(running_mean, running_var, batch_stats)
    positions = x.ndim > 2

    def fn(m: Moments, mean_weight: Tensor, var_weight: Tensor, weight: Tensor | None,
           bias: Tensor | None) -> tuple[Tensor, Tensor]:
        ln = merged(m, "sample")
        mu_bn, var_bn = _batch_part(m, fixed)
        means, variances = [ln.mean, mu_bn], [ln.var, var_bn]
        if positions:
            means.insert(0, m.mean)
            variances.insert(0, m.var)
        k = len(means)
        wm = torch.softmax(mean_weight[-k:].to(m.mean.dtype), 0)
        wv = torch.softmax(var_weight[-k:].to(m.mean.dtype), 0)
        mean = sum(w * t for w, t in zip(wm.unbind(0), means))
        var = sum(w * t for w, t in zip(wv.unbind(0), variances))
        return scale_shift(mean, var, eps, weight, bias)  # type: ignore[arg-type]

    y, m = fused_affine_norm(x, cd, fn, (mean_weight, var_weight, weight, bias))
    return y, (merged(m, "batch") if batch_stats else None)
