"""The verdict rule, the same for every claim and fixed before any number was seen.

For each seed s, ``differences[s]`` is the paired difference in the direction the paper
claims (same seed = same split, initialisation and batch order), positive when the paper's
side is ahead. ``d`` is their mean and ``se`` their standard error (sample standard deviation,
ddof = 1, over sqrt(seeds)).

- ``directional`` claims ("A beats B"): reproduced if d > 2 se, contradicted if d < -2 se,
  otherwise inconclusive.
- ``within`` claims, which the papers (and the issue) state as "A within 2 se of B": the
  same d and se; reproduced if |d| <= 2 se, contradicted otherwise. (Such a claim is easier to
  "reproduce" with few, noisy seeds: the report says so.)
"""

from __future__ import annotations

import math
from typing import Sequence

__all__ = ["RULE_TEXT", "paired_stats", "verdict", "REPRODUCED", "CONTRADICTED", "INCONCLUSIVE", "RULES"]

REPRODUCED, CONTRADICTED, INCONCLUSIVE = "reproduced", "contradicted", "inconclusive"
RULES = ("directional", "within")

RULE_TEXT = (
    "d = mean over seeds of the paired difference in the direction the paper claims (same seed = "
    "same split, initialisation and batch order; positive = the paper's side ahead); se = sample "
    "standard deviation of those differences (ddof 1) / sqrt(seeds). \"A beats B\" claims: reproduced "
    "if d > 2 se, contradicted if d < -2 se, otherwise inconclusive. \"A within 2 se of B\" claims: "
    "reproduced if |d| <= 2 se, contradicted otherwise (such a claim is easier to reproduce with few, noisy "
    "seeds, and with se = 0 it needs d = 0 exactly). A run that diverged scores chance error. The rule, every setup, the seeds, metric and "
    "direction were fixed in code before any run; no setup was changed after a result was seen.")


def paired_stats(differences: Sequence[float]) -> tuple[float, float]:
    """(d, se) of per-seed paired differences; se is nan for fewer than two seeds."""
    k = len(differences)
    if k == 0:
        raise ValueError("paired_stats: no differences (no seed ran)")
    d = math.fsum(differences) / k
    if k < 2:
        return d, math.nan
    var = math.fsum((x - d) ** 2 for x in differences) / (k - 1)
    return d, math.sqrt(var) / math.sqrt(k)


def verdict(d: float, se: float, rule: str = "directional") -> str:
    """The verdict for mean paired difference ``d`` and standard error ``se``."""
    if rule not in RULES:
        raise ValueError(f"verdict: rule must be one of {RULES}, got {rule!r}")
    if math.isnan(d) or math.isnan(se):
        return INCONCLUSIVE
    if rule == "within":
        return REPRODUCED if abs(d) <= 2 * se else CONTRADICTED
    if d > 2 * se:
        return REPRODUCED
    if d < -2 * se:
        return CONTRADICTED
    return INCONCLUSIVE
