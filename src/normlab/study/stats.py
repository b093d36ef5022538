"""The study's statistics: paired differences between norms over seeds.

Every norm trained with one seed sees the same split, the same initialisation of the layers
the norms share and the same batch order, so the comparison of two norms is paired: per
seed ``d_s = metric(a, s) - metric(b, s)``, and the 95% confidence interval of the mean
difference is the t-interval ``mean(d) +- t_{0.975, n-1} * sd(d) / sqrt(n)`` (Student 1908;
sd with the n-1 denominator). With fewer than ``MIN_SEEDS`` seeds the interval is not
estimated: two values give a standard deviation on one degree of freedom, and an interval
12.7 of them wide says nothing a user can act on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

__all__ = ["MIN_SEEDS", "Paired", "paired_difference", "t_quantile"]

MIN_SEEDS = 3


def t_quantile(df: int, level: float = 0.95) -> float:
    """The two-sided ``level`` quantile of Student's t with ``df`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


@dataclass(frozen=True)
class Paired:
    """Mean of the paired differences over ``n`` seeds and its confidence interval
    (``low``/``high`` None when ``n < MIN_SEEDS``)."""

    n: int
    mean: float
    low: float | None = None
    high: float | None = None

    @property
    def estimated(self) -> bool:
        return self.low is not None

    @property
    def half_width(self) -> float | None:
        return None if self.low is None or self.high is None else (self.high - self.low) / 2

    def beyond(self, resolution: float = 0.0) -> bool:
        """The difference is real: the interval excludes zero and the mean is at least
        ``resolution`` (one validation example) away from it."""
        if self.low is None or self.high is None:
            return False
        return (self.low > 0 or self.high < 0) and abs(self.mean) >= resolution


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Paired:
    """``a - b`` paired by seed (the seeds both have), with its t-interval."""
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan)
    mean = math.fsum(d) / n
    if n < MIN_SEEDS:
        return Paired(n, mean)
    sd = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (n - 1))
    half = t_quantile(n - 1, level) * sd / math.sqrt(n)
    return Paired(n, mean, mean - half, mean + half)
