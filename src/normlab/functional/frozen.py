"""Frozen batch norm: batch norm's eval expression with fixed statistics, in training too."""

from __future__ import annotations

import torch
from torch import Tensor

from .._layout import per_channel


def frozen_batch_norm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    channel_dim: int = 1,
) -> Tensor:
    r"""Batch norm (Ioffe & Szegedy 2015) with fixed statistics and affine map::

        y = x * s + (bias - running_mean * s),   s = weight / sqrt(running_var + eps)

    per channel: the eval-mode batch norm, in training as in eval (the "frozen BN" of
    detection backbones). The per-channel ``s`` and shift are folded first, so the input is
    read once and written once (one ``addcmul``), and backward saves only ``s`` (C values)
    when the statistics and affine are fixed tensors, as they are in
    :class:`normlab.layers.FrozenBatchNorm`.
    """
    scale, shift = frozen_scale_shift(running_mean, running_var, weight, bias, eps)
    # half input into a float32 layer: the output keeps the input's dtype, as torch's batch norm's
    scale, shift = scale.to(x.dtype), shift.to(x.dtype)
    return torch.addcmul(per_channel(shift, x.ndim, channel_dim), x, per_channel(scale, x.ndim, channel_dim))


def frozen_scale_shift(running_mean: Tensor, running_var: Tensor, weight: Tensor | None, bias: Tensor | None,
                       eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel ``(s, t)`` with ``batch_norm_eval(x) = s * x + t``: ``s = weight /
    sqrt(running_var + eps)``, ``t = bias - running_mean * s`` (also what folding puts into
    the preceding layer, Ioffe & Szegedy 2015, Algorithm 2)."""
    scale = torch.rsqrt(running_var + eps)
    if weight is not None:
        scale = scale * weight
    shift = -running_mean * scale
    if bias is not None:
        shift = shift + bias
    return scale, shift
