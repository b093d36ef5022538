"""Where the statistics axes are, given where the channel axis is.

The channel axis is a parameter (``channel_dim``, 1 by default), not an assumption. Each
norm names its statistics axes relative to the batch axis (always 0) and the channel axis:

==========  ==============================  ==========================================
``over``    axes reduced                    norms
==========  ==============================  ==========================================
"batch"     every axis but the channel      bn, mobn, brn, the BN part of bin and sn
"sample"    every axis but the batch        ln, rms (the group-norm paper's layer norm)
"spatial"   every axis but batch, channel   in, the IN part of bin and sn
"channel"   the channel axis alone          lnc, rmsc (transformer / ConvNeXt style)
==========  ==============================  ==========================================

So a channels-last image ``(N, H, W, C)`` or a sequence ``(N, L, C)`` needs no code path
of its own: pass ``channel_dim=-1``.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor

Over = Literal["batch", "sample", "spatial", "channel"]


def channel_axis(ndim: int, channel_dim: int) -> int:
    """``channel_dim`` as a non-negative index; the batch axis 0 cannot be the channel axis."""
    if ndim < 2:
        raise ValueError(f"expected an input with a batch and a channel axis (rank >= 2), got rank {ndim}")
    if not -ndim <= channel_dim < ndim:
        raise ValueError(f"channel_dim={channel_dim} is out of range for an input of rank {ndim}")
    cd = channel_dim % ndim
    if cd == 0:
        raise ValueError(f"channel_dim={channel_dim} names the batch axis 0; the channel axis must be another one")
    return cd


def stat_dims(ndim: int, channel_dim: int, over: Over) -> tuple[int, ...]:
    """The axes a norm reduces over, for an input of rank ``ndim``."""
    cd = channel_axis(ndim, channel_dim)
    if over == "batch":
        return tuple(d for d in range(ndim) if d != cd)
    if over == "sample":
        return tuple(range(1, ndim))
    if over == "spatial":
        return tuple(d for d in range(1, ndim) if d != cd)
    if over == "channel":
        return (cd,)
    raise ValueError(f"unknown statistics axes {over!r}")


def per_channel(v: Tensor | None, ndim: int, channel_dim: int) -> Tensor | None:
    """View a length-C vector so it broadcasts along the channel axis of a rank-``ndim`` input."""
    if v is None:
        return None
    shape = [1] * ndim
    shape[channel_axis(ndim, channel_dim)] = -1
    return v.view(shape)


def spatial_size(x: Tensor, channel_dim: int) -> int:
    """Number of positions per (sample, channel): the product of the non-batch, non-channel sizes."""
    n = 1
    for d in stat_dims(x.ndim, channel_dim, "spatial"):
        n *= x.shape[d]
    return n
