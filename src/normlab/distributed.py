"""Synchronized batch statistics: exact, differentiable all-reduce of partial moments.

Each process summarizes its local batch as per-channel ``(count, mean, M2)``; one
``all_gather`` ships all three, and every process merges them with Chan's formula in the
same order, so all ranks hold bit-identical moments of the global batch. The collective is
the autograd-aware one from ``torch.distributed.nn``, so the backward pass all-reduces the
gradient terms of the statistics and input gradients equal those of one process holding
the whole batch. Ranks may hold different batch sizes, including zero.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ._moments import Moments, reduce_moments

__all__ = ["all_reduce_moments", "is_active"]


def is_active(process_group=None) -> bool:
    """True if torch.distributed is initialized and the group has more than one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    return dist.get_world_size(process_group) > 1


def all_reduce_moments(local: Moments, process_group=None) -> Moments:
    """Merge every rank's ``Moments`` into those of the union, in one collective.

    ``process_group=None`` means torch's default group. With one process (or none
    initialized) the local moments are returned unchanged.
    """
    if not is_active(process_group):
        return local
    from torch.distributed.nn.functional import all_gather

    mean, m2 = local.mean, local.m2
    count = local.count if isinstance(local.count, Tensor) else torch.tensor(float(local.count), device=mean.device)
    count = count.to(mean.dtype).expand_as(mean)
    packed = torch.stack([count, mean, m2])  # (3, *stat_shape): one message per rank
    group = dist.group.WORLD if process_group is None else process_group
    gathered = torch.stack(all_gather(packed, group=group))  # (world, 3, *stat_shape)
    counts, means, m2s = gathered.unbind(1)
    merged = reduce_moments(Moments(counts, means, m2s), 0)
    return Moments(merged.count.squeeze(0), merged.mean.squeeze(0), merged.m2.squeeze(0))
