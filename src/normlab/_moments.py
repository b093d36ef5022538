"""The statistics core: moments over axes, exact merges, the running-average rule.

Every normalization in normlab is "statistics over some axes, maybe mixed, then an affine
map"; this module is the one place that computes the statistics. Nothing else in the
library computes a variance.

A set of moments is kept as ``(count, mean, m2)`` where ``m2`` is the sum of squared
deviations from ``mean``. Two such summaries merge exactly (Chan, Golub & LeVeque 1979):

    n = n_a + n_b,  delta = mean_b - mean_a
    mean = mean_a + delta * n_b / n
    m2 = m2_a + m2_b + delta^2 * n_a * n_b / n

so per-(sample, channel) moments combine into per-channel (batch norm), per-sample (layer
norm) or mixed (switchable norm) moments at O(N*C) cost, and moments from several
processes combine into those of the whole batch, without cancellation.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

__all__ = [
    "Moments",
    "accumulation_dtype",
    "mean_var",
    "moments",
    "merge",
    "reduce_moments",
    "group_moments",
    "running_factor",
    "shaped_like",
    "update_running_stats",
]


class Moments(NamedTuple):
    """Summary of a set of values: how many, their mean, and the sum of squared deviations.

    ``count`` broadcasts against ``mean`` and ``m2`` (a Python number when every slot
    summarizes the same number of values, a tensor otherwise).
    """

    count: Tensor | float
    mean: Tensor
    m2: Tensor

    @property
    def var(self) -> Tensor:
        """Biased (population) variance, ``m2 / count``; 0 where the count is 0."""
        if isinstance(self.count, Tensor):
            return self.m2 / self.count.clamp_min(1)
        return self.m2 / max(self.count, 1)

    @property
    def unbiased_var(self) -> Tensor:
        """Sample variance, ``m2 / (count - 1)`` (what torch stores as ``running_var``)."""
        if isinstance(self.count, Tensor):
            return self.m2 / (self.count - 1).clamp_min(1)
        return self.m2 / max(self.count - 1, 1)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half-precision inputs (their sums overflow and lose digits), else dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _dims(x: Tensor, dims: Sequence[int] | int) -> tuple[int, ...]:
    if isinstance(dims, int):
        dims = (dims,)
    return tuple(d % x.ndim for d in dims)


def _count(x: Tensor, dims: tuple[int, ...]) -> int:
    n = 1
    for d in dims:
        n *= x.shape[d]
    return n


def mean_var(x: Tensor, dims: Sequence[int] | int) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``x`` over ``dims`` (kept as size-1 axes).

    Two passes (the mean, then the mean of squared deviations) so that inputs whose mean
    is far larger than their spread keep their precision, unlike ``E[x^2] - E[x]^2``.
    Half-precision inputs are accumulated in float32 and the moments returned in float32.
    We avoid ``torch.var``: on CPU it runs a scalar loop about 30x slower than ``mean``.
    """
    dims = _dims(x, dims)
    acc = accumulation_dtype(x.dtype)
    mean = x.mean(dims, keepdim=True, dtype=acc)
    centered = x.to(acc) - mean
    var = (centered * centered).mean(dims, keepdim=True)
    return mean, var


def moments(x: Tensor, dims: Sequence[int] | int) -> Moments:
    """``Moments`` of ``x`` over ``dims`` (kept as size-1 axes)."""
    dims = _dims(x, dims)
    mean, var = mean_var(x, dims)
    count = _count(x, dims)
    return Moments(count, mean, var * count)


def merge(a: Moments, b: Moments) -> Moments:
    """Exact moments of the union of two disjoint sets (Chan et al.); counts may be 0."""
    n = a.count + b.count
    n_safe = n.clamp_min(1) if isinstance(n, Tensor) else max(n, 1)
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / n_safe)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / n_safe)
    return Moments(n, mean, m2)


def reduce_moments(m: Moments, dims: Sequence[int] | int) -> Moments:
    """Merge the moments held along ``dims`` into one, exactly (size-1 axes kept).

    For example per-(sample, channel) moments of shape (N, C, 1, 1) reduced over dim 0
    give the per-channel moments of the whole batch. Slots with count 0 contribute nothing.
    """
    dims = _dims(m.mean, dims)
    if not isinstance(m.count, Tensor) and m.count > 0 and all(m.mean.shape[d] > 0 for d in dims):
        # equal counts (the common case): the mean of the means, and M2 plus their spread
        mean = m.mean.mean(dims, keepdim=True)
        dev = m.mean - mean
        m2 = m.m2.sum(dims, keepdim=True).add_((dev * dev).sum(dims, keepdim=True), alpha=m.count)
        n = m.count
        for d in dims:
            n *= m.mean.shape[d]
        return Moments(n, mean, m2)
    count = m.count if isinstance(m.count, Tensor) else torch.tensor(float(m.count), device=m.mean.device)
    count = count.to(m.mean.dtype).expand_as(m.mean)
    total = count.sum(dims, keepdim=True)
    total_safe = total.clamp_min(1)
    mean = (count * m.mean).sum(dims, keepdim=True) / total_safe
    dev = m.mean - mean
    m2 = m.m2.sum(dims, keepdim=True) + (count * dev * dev).sum(dims, keepdim=True)
    if not isinstance(m.count, Tensor):
        # every slot had the same count, so the total is a plain number too
        n = m.count
        for d in dims:
            n *= m.mean.shape[d]
        return Moments(n, mean, m2)
    return Moments(total, mean, m2)


def group_moments(mean: Tensor, m2: Tensor, count: int, groups: int, center: bool = True) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) moments ``(N, C)`` of ``count`` values each, merged exactly over
    groups of C/G consecutive channels and expanded back to (N, C): the group mean and the
    biased group variance; ``center=False``: zero and the group's mean square (RMS norm).
    Layer norm is one group, instance norm C groups."""
    n, c = mean.shape
    mg, qg = mean.view(n, groups, -1), m2.view(n, groups, -1)
    if center:
        mu = mg.mean(2, keepdim=True)  # equal counts per channel: the exact merge
        var = (qg.sum(2, keepdim=True) / count + ((mg - mu) ** 2).sum(2, keepdim=True)) / (c // groups)
        return mu.expand_as(mg).reshape(n, c), var.expand_as(mg).reshape(n, c)
    ms = (qg / count + mg * mg).mean(2, keepdim=True)
    return torch.zeros_like(mean), ms.expand_as(mg).reshape(n, c)


def running_factor(
    momentum: float | None, num_batches_tracked: Tensor | None, dtype: torch.dtype = torch.float32
) -> float | Tensor:
    """The weight of the new batch in a running average, as torch's batch norm defines it.

    ``momentum`` gives an exponential moving average; ``None`` gives the cumulative
    average of every batch seen, weight ``1 / num_batches_tracked`` (counted after the
    current batch has been added), computed in ``dtype`` (the running buffers' dtype, so
    float64 buffers get a float64-exact weight).
    """
    if momentum is not None:
        return momentum
    if num_batches_tracked is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    # a tensor, not a Python float, so that torch.compile(fullgraph=True) needs no .item()
    return 1.0 / num_batches_tracked.clamp_min(1).to(dtype)


@torch.no_grad()
def update_running_stats(
    running_mean: Tensor | None,
    running_var: Tensor | None,
    batch: Moments,
    factor: float | Tensor,
) -> None:
    """``running <- (1 - factor) * running + factor * batch`` in place.

    The variance is stored unbiased (``m2 / (count - 1)``), as torch's batch norm does and
    as Ioffe & Szegedy's Algorithm 2 prescribes for inference. ``batch`` holds one value
    per running slot (any size-1 axes are dropped).
    """
    if isinstance(factor, Tensor):
        ref = running_mean if running_mean is not None else running_var
        if ref is not None:
            factor = factor.to(ref.dtype)
    if running_mean is not None:  # (no graph is recorded here: no detach needed)
        running_mean.lerp_(shaped_like(batch.mean, running_mean), factor)
    if running_var is not None:
        running_var.lerp_(shaped_like(batch.unbiased_var, running_var), factor)


def shaped_like(t: Tensor, ref: Tensor) -> Tensor:
    """``t`` in the shape and dtype of ``ref`` (a buffer, a parameter), with no operation where
    it already is: a norm's step pays each small one (see normlab.engine.describe)."""
    if t.shape != ref.shape:
        t = t.reshape(ref.shape)
    return t if t.dtype == ref.dtype else t.to(ref.dtype)
