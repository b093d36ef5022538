"""Pieces every normalization function shares: the normalize-then-affine map and the
batch-statistics step (local moments, optional all-reduce, running-average update)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _moments
from .._layout import Over, per_channel, stat_dims
from .._moments import Moments


def affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, channel_dim: int) -> Tensor:
    """``y * weight + bias`` with per-channel ``weight`` and ``bias`` (either may be None)."""
    if weight is not None:
        y = y * per_channel(weight, y.ndim, channel_dim)
    if bias is not None:
        y = y + per_channel(bias, y.ndim, channel_dim)
    return y


def normalize(
    x: Tensor,
    mean: Tensor | None,
    var: Tensor,
    eps: float,
    weight: Tensor | None,
    bias: Tensor | None,
    channel_dim: int,
) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias``, returned in ``x``'s dtype.

    ``mean``/``var`` broadcast against ``x`` (size-1 axes kept); ``mean=None`` skips the
    centring (RMS norm). Statistics of half inputs arrive in float32 and the arithmetic
    stays there until the final cast.
    """
    rstd = torch.rsqrt(var + eps)
    y = (x - mean) * rstd if mean is not None else x * rstd
    return affine(y, weight, bias, channel_dim).to(x.dtype)


def batch_moments(x: Tensor, channel_dim: int, process_group=None) -> Moments:
    """Per-channel moments over every other axis, all-reduced over ``process_group`` if given.

    Returned with the reduced axes kept as size 1, so they broadcast against ``x``.
    """
    dims = stat_dims(x.ndim, channel_dim, "batch")
    if x.numel() == 0:
        # a rank may hold no samples; it still contributes (count 0) to the collective
        shape = [1] * x.ndim
        shape[channel_dim % x.ndim] = x.shape[channel_dim]
        acc = _moments.accumulation_dtype(x.dtype)
        zeros = x.new_zeros(shape, dtype=acc) + x.sum() * 0  # keep x in the graph
        local = Moments(0, zeros, zeros.clone())
    else:
        local = _moments.moments(x, dims)
    if process_group is None:
        return local
    from .. import distributed

    return distributed.all_reduce_moments(local, process_group)


def batch_statistics(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float | Tensor | None,
    channel_dim: int,
    process_group=None,
) -> tuple[Tensor, Tensor]:
    """The (mean, biased var) a batch-statistic norm normalizes with, broadcastable to ``x``.

    In training (or when no running statistics exist) the batch's own moments, which also
    update the running buffers in place by ``momentum`` (the weight of this batch, already
    resolved from ``None`` by the caller); in eval the running statistics.
    """
    if training or running_mean is None or running_var is None:
        m = batch_moments(x, channel_dim, process_group)
        empty = not isinstance(m.count, Tensor) and m.count == 0  # no values: nothing to average in
        if training and momentum is not None and not empty and (running_mean is not None or running_var is not None):
            _moments.update_running_stats(running_mean, running_var, m, momentum)
        return m.mean, m.var
    return (
        per_channel(running_mean, x.ndim, channel_dim),
        per_channel(running_var, x.ndim, channel_dim),
    )


def dims_for(x: Tensor, channel_dim: int, over: Over) -> tuple[int, ...]:
    return stat_dims(x.ndim, channel_dim, over)
