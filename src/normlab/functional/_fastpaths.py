"""Fast CPU entry points of the standard norms, on top of :mod:`._fused`.

Each returns the normalized tensor, or ``None`` when the fast path does not apply (CUDA,
half precision, strides that are neither channel-first nor channels-last dense,
``torch.compile``, an empty batch); the public functions then take their plain autograd
path, which stays the reference. Running statistics are updated here exactly as the
plain path does (from the same batch moments, merged exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _moments
from .._layout import channel_axis, per_channel
from .._moments import Moments
from ._fused import batch_norm_train, fast_layout, fused_affine_norm, merged, standard_stat_fn

__all__ = ["batch_norm_fast", "group_norm_fast", "instance_norm_fast", "layer_norm_fast", "rms_norm_fast"]


def _update(running_mean: Tensor | None, running_var: Tensor | None, m: Moments, momentum) -> None:
    if momentum is not None and (running_mean is not None or running_var is not None):
        _moments.update_running_stats(running_mean, running_var, m, momentum)


def affine_eval(x: Tensor, cd: int, mean: Tensor, var: Tensor, eps: float, weight: Tensor | None,
                bias: Tensor | None) -> Tensor:
    """``weight * (x - mean) / sqrt(var + eps) + bias`` with per-channel constants, one pass."""
    if cd == 1 and (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, False)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -mean * scale
    if bias is not None:
        shift = shift + bias
    return torch.addcmul(per_channel(shift, x.ndim, cd), x, per_channel(scale, x.ndim, cd))  # type: ignore[arg-type]


def batch_norm_fast(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                    bias: Tensor | None, training: bool, momentum, eps: float, channel_dim: int) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    if fast_layout(x, cd) is None:
        return None
    if training or running_mean is None or running_var is None:
        got = batch_norm_train(x, weight, bias, eps) if cd == 1 else None
        y, m = got if got is not None else fused_affine_norm(x, cd, standard_stat_fn("batch", eps), (weight, bias),
                                                            per_channel=True)
        if training:
            _update(running_mean, running_var, merged(m, "batch"), momentum)
        return y
    return affine_eval(x, cd, running_mean, running_var, eps, weight, bias)


def layer_norm_fast(x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, channel_dim: int) -> Tensor | None:
    return group_norm_fast(x, 1, weight, bias, eps, channel_dim)


def group_norm_fast(x: Tensor, num_groups: int, weight: Tensor | None, bias: Tensor | None, eps: float,
                    channel_dim: int) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    layout = fast_layout(x, cd)
    if layout is None or x.numel() // (x.shape[0] * num_groups) == 1:  # one value per group: exact 0 there
        return None
    if layout == "cf":
        # torch's own kernel: one vectorised Welford pass forward, one fused backward
        return F.group_norm(x.movedim(cd, 1), num_groups, weight, bias, eps).movedim(1, cd)
    over = "sample" if num_groups == 1 else "spatial" if num_groups == x.shape[cd] else "group"
    return fused_affine_norm(x, cd, standard_stat_fn(over, eps, num_groups), (weight, bias))[0]


def instance_norm_fast(x: Tensor, weight: Tensor | None, bias: Tensor | None, running_mean: Tensor | None,
                       running_var: Tensor | None, momentum, eps: float, channel_dim: int) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    tracking = momentum is not None and (running_mean is not None or running_var is not None)
    if not tracking:
        return group_norm_fast(x, x.shape[cd], weight, bias, eps, channel_dim)
    if fast_layout(x, cd) is None:
        return None
    y, m = fused_affine_norm(x, cd, standard_stat_fn("spatial", eps), (weight, bias))
    # batch average of the per-instance moments (the mean of unbiased variances), as the plain path
    _update(running_mean, running_var, Moments(m.count, m.mean.mean(0), m.m2.mean(0)), momentum)
    return y


def rms_norm_fast(x: Tensor, weight: Tensor | None, eps: float, channel_dim: int) -> Tensor | None:
    cd = channel_axis(x.ndim, channel_dim)
    if fast_layout(x, cd) is None:
        return None
    return fused_affine_norm(x, cd, standard_stat_fn("sample", eps, center=False), (weight, None))[0]
