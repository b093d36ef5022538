"""Per-sample normalizations: layer, instance, group and RMS norm, and the transformer-style
layer and RMS norm over the channel axis alone. None of them uses batch statistics, so each
behaves the same in training and evaluation (instance norm unless it tracks running stats)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _kernels, _moments
from .._layout import channel_axis
from .._moments import Moments
from ._common import affine, dims_for, normalize
from ._fastpaths import (dtypes_of, group_norm_fast, instance_norm_fast, layer_norm_fast, rms_norm_fast,
                         torch_group_norm)
from ._routing import fast_layout, route
from ._fused_row import RowRMSKernel


def layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float = 1e-5, channel_dim: int = 1
) -> Tensor:
    r"""Layer normalization (Ba, Kiros & Hinton, 2016, arXiv:1607.06450), channel-first sense.

    Per sample, over every non-batch axis (C and all positions), with a per-channel affine
    map, as in the group-norm paper (Wu & He 2018): it equals ``group_norm`` with one group::

        y = weight_c * (x - mean_n) / sqrt(var_n + eps) + bias_c

    For the transformer convention (over the channel axis alone) use ``channel_layer_norm``.
    """
    way = route("ln", x, channel_dim, 1, dtypes_of(weight, bias))
    if way == "torch":
        return torch_group_norm(x, 1, weight, bias, eps, channel_dim)
    fast = layer_norm_fast(x, weight, bias, eps, channel_dim) if way == "engine" else None
    if fast is not None:
        return fast
    mean, var = _moments.mean_var(x, dims_for(x, channel_dim, "sample"))
    return normalize(x, mean, var, eps, weight, bias, channel_dim)


def instance_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    use_input_stats: bool = True,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = 1,
) -> Tensor:
    r"""Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016, arXiv:1607.08022).

    Per sample n and channel c, over the positions only::

        y = weight_c * (x - mu_nc) / sqrt(sigma2_nc + eps) + bias_c

    The same computation at training and test time. If running buffers are given and
    ``use_input_stats`` is true they are updated with the batch average of the instance
    moments (torch's ``track_running_stats``); ``use_input_stats=False`` normalizes with them.
    """
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm: use_input_stats=False needs running_mean and running_var")
        from .._layout import per_channel

        return normalize(
            x,
            per_channel(running_mean, x.ndim, channel_dim),
            per_channel(running_var, x.ndim, channel_dim),
            eps,
            weight,
            bias,
            channel_dim,
        )
    tracking = momentum is not None and (running_mean is not None or running_var is not None)
    c = x.shape[channel_axis(x.ndim, channel_dim)]
    way = route("in", x, channel_dim, c, dtypes_of(weight, bias), (not tracking,))
    if way == "torch":
        return torch_group_norm(x, c, weight, bias, eps, channel_dim)
    fast = instance_norm_fast(x, weight, bias, running_mean, running_var, momentum, eps, channel_dim) \
        if way == "engine" else None
    if fast is not None:
        return fast
    m = _moments.moments(x, dims_for(x, channel_dim, "spatial"))
    if momentum is not None and x.numel() > 0 and (running_mean is not None or running_var is not None):
        # batch average of the per-instance moments (the mean of unbiased variances);
        # an empty batch has none to average (torch turns its running stats into NaN)
        _moments.update_running_stats(running_mean, running_var, Moments(m.count, m.mean.mean(0), m.m2.mean(0)), momentum)
    return normalize(x, m.mean, m.var, eps, weight, bias, channel_dim)


def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    channel_dim: int = 1,
) -> Tensor:
    r"""Group normalization (Wu & He, ECCV 2018, arXiv:1803.08494).

    The C channels are split into ``num_groups`` groups of consecutive channels; per sample
    and group, statistics over the group's channels and every position::

        x -> (N, G, C/G, *spatial);  mu_ng, sigma2_ng over (C/G, *spatial)
        y = weight_c * (x - mu_ng) / sqrt(sigma2_ng + eps) + bias_c

    ``num_groups=1`` is ``layer_norm``; ``num_groups=C`` is ``instance_norm``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    channels = x.shape[cd]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide the {channels} channels")
    way = route("gn", x, cd, num_groups, dtypes_of(weight, bias))
    if way == "torch":
        return torch_group_norm(x, num_groups, weight, bias, eps, cd)
    fast = group_norm_fast(x, num_groups, weight, bias, eps, channel_dim) if way == "engine" else None
    if fast is not None:
        return fast
    xg = x.unflatten(cd, (num_groups, channels // num_groups))
    dims = tuple(d for d in range(1, xg.ndim) if d != cd)
    mean, var = _moments.mean_var(xg, dims)
    y = normalize(xg, mean, var, eps, None, None, cd).flatten(cd, cd + 1)
    return affine(y, weight, bias, channel_dim).to(x.dtype)


def _rms_eps(eps: float | None, x: Tensor) -> float:
    # torch.nn.RMSNorm's eps=None means the machine epsilon of the input's dtype
    return torch.finfo(x.dtype).eps if eps is None else eps


def rms_norm(
    x: Tensor, weight: Tensor | None = None, *, eps: float | None = 1e-6, channel_dim: int = 1
) -> Tensor:
    r"""RMS normalization (Zhang & Sennrich, NeurIPS 2019, arXiv:1910.07467) per sample.

    Over every non-batch axis, no centring, a per-channel gain::

        y = weight_c * x / sqrt(mean_n(x^2) + eps)
    """
    fast = rms_norm_fast(x, weight, _rms_eps(eps, x), channel_dim)
    if fast is not None:
        return fast
    dims = dims_for(x, channel_dim, "sample")
    ms = x.to(_moments.accumulation_dtype(x.dtype)).square().mean(dims, keepdim=True)
    return normalize(x, None, ms, _rms_eps(eps, x), weight, None, channel_dim)


def _channel_last_view(x: Tensor, cd: int) -> Tensor | None:
    """``x`` with its channel axis moved last, if that is a contiguous view (no copy)."""
    if cd == x.ndim - 1:  # (no movedim: each view costs a few microseconds on small inputs)
        return x if x.is_contiguous() else None
    moved = x.movedim(cd, -1)
    return moved if moved.is_contiguous() else None


def channel_layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float = 1e-5, channel_dim: int = 1
) -> Tensor:
    r"""Layer norm over the channel axis alone at each position (transformer, ConvNeXt).

    Ba et al. 2016's layer norm as transformers use it (Vaswani et al. 2017; ConvNeXt,
    Liu et al. 2022): for every sample and position, over the C channels::

        y = weight_c * (x - mean_c(x)) / sqrt(var_c(x) + eps) + bias_c

    With ``channel_dim=-1`` this is ``torch.nn.LayerNorm(C)``. When the channel axis is the
    innermost in memory (channel-last tensors, ``channels_last`` images) the native kernel
    runs on a view; otherwise the moments come from the statistics core.
    """
    cd = channel_axis(x.ndim, channel_dim)
    view = _channel_last_view(x, cd)
    if view is not None:
        y = F.layer_norm(view, (x.shape[cd],), weight, bias, eps)
        return y if cd == x.ndim - 1 else y.movedim(-1, cd)
    mean, var = _moments.mean_var(x, (cd,))
    return normalize(x, mean, var, eps, weight, bias, channel_dim)


def channel_rms_norm(
    x: Tensor, weight: Tensor | None = None, *, eps: float | None = 1e-6, channel_dim: int = 1
) -> Tensor:
    r"""RMS norm over the channel axis alone at each position (Zhang & Sennrich 2019).

    ``y = weight_c * x / sqrt(mean_c(x^2) + eps)``; with ``channel_dim=-1`` this is
    ``torch.nn.RMSNorm(C)`` (whose ``eps=None`` means the dtype's machine epsilon).
    """
    cd = channel_axis(x.ndim, channel_dim)
    view = _channel_last_view(x, cd)
    if view is not None and fast_layout(x, cd, half=True) == "cl" and _kernels.supports(x.dtype):
        # compiled kernels: one read of each row forward and backward (torch's CPU RMSNorm is a
        # composite with several full-size temporaries)
        rows = RowRMSKernel.apply(view.reshape(-1, x.shape[cd]), weight, _rms_eps(eps, x))
        return rows.view(view.shape).movedim(-1, cd)
    if view is not None:
        return F.rms_norm(view, (x.shape[cd],), weight, eps).movedim(-1, cd)
    ms = x.to(_moments.accumulation_dtype(x.dtype)).square().mean(cd, keepdim=True)
    return normalize(x, None, ms, _rms_eps(eps, x), weight, None, channel_dim)
