"""Run claims through the study runner and store, then read each arm's per-seed values back
from the store's rows and apply the verdict rule. ``reproduce.json``'s content is built here.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from ..config import CellConfig
from ..runner import run_grid
from ..store import Store
from ..tasks import get_task
from .claims import Claim, Comparison
from .verdict import RULE_TEXT, paired_stats, verdict

__all__ = ["availability", "claim_cells", "run_claims", "evaluate_claims", "arm_value", "same_difference_note"]


def availability(claim: Claim, quick: bool = False) -> str | None:
    """None when every arm's task and norm spec exist here; else "<spec> not available" (why)."""
    for arm in claim.arms:
        try:
            task = get_task(arm.task)
        except ValueError:
            return f"task {arm.task} not available"
        try:
            if not arm.task.startswith("reproduce/") or arm.norm.endswith("+ws"):  # a registry spec
                from ...registry import parse_spec

                parse_spec(arm.norm)
            model = task.build_model(arm.norm, int(claim.fields(arm, quick).get("width", 16)))
        except Exception as err:  # noqa: BLE001 (the reason is reported)
            return f"{arm.norm} not available ({type(err).__name__}: {err})"
        if arm.norm.endswith("+ws") and not standardizes_convs(model, task.input_shape):
            return f"{arm.norm} not available (the model built for it does not weight-standardize its convs)"
    return None


def standardizes_convs(model: Any, input_shape: tuple[int, ...]) -> bool:
    """Whether the model's first conv weight is standardized (Qiao et al. 2019) before use: its
    output is unchanged when the raw weight is scaled by 3 and shifted by 0.5 per output channel,
    which weight standardization removes and a plain conv (even followed by group norm) does not."""
    import torch

    raw = next((p for p in model.parameters() if p.ndim == 4), None)
    if raw is None:
        return False
    x = torch.randn(4, *input_shape, generator=torch.Generator().manual_seed(0))
    model.train()
    with torch.no_grad():
        before = model(x)
        raw.mul_(3.0).add_(0.5)
        after = model(x)
    return bool(torch.allclose(before, after, atol=1e-4, rtol=1e-3))


def claim_cells(claim: Claim, seeds: list[int], quick: bool) -> dict[str, list[CellConfig]]:
    return claim.cells(seeds, quick)


def arm_value(comp: Comparison, row: dict[str, Any], curve: list[tuple[float, Any, Any]]) -> float:
    """One arm's value for one seed from its stored row (and curve, for a target claim).

    A diverged run of an error metric scores chance error (1 - 1/classes); for other metrics
    it is nan (and the comparison inconclusive). ``comp.curve_target``: the first epoch at which
    the validation error is at most the target; never reached: one check past the end.
    """
    if comp.curve_target is not None:
        for epoch, _, metric in curve:
            if metric is not None and metric <= comp.curve_target:
                return float(epoch)
        return float(row["epochs"]) + 1.0 / float(row["curve_points"])
    if row["status"] == "ok" and row["val_metric"] is not None:
        return float(row["val_metric"])
    if row["metric"] == "error":
        return 1.0 - 1.0 / get_task(row["task"]).num_classes
    return math.nan


def run_claims(claims: list[Claim], seeds: list[int], quick: bool, store: Store, workers: int = 1,
               progress: bool = True, backend: Callable[..., Any] | None = None) -> dict[str, str]:
    """Run every available claim's cells (already stored ones are skipped); returns
    {claim id: reason} for the claims that cannot run here."""
    skipped: dict[str, str] = {}
    cells: list[CellConfig] = []
    for claim in claims:
        reason = availability(claim, quick)
        if reason:
            skipped[claim.id] = reason
            continue
        for arm_cells in claim_cells(claim, seeds, quick).values():
            cells.extend(arm_cells)
    if cells:
        (backend or run_grid)(cells, store, workers=workers, progress=progress)
    return skipped


def _interval(values: list[float]) -> tuple[float, float]:
    """95% t interval of the mean over seeds."""
    from scipy import stats

    k = len(values)
    m = math.fsum(values) / k
    if k < 2:
        return m, m
    sd = math.sqrt(math.fsum((v - m) ** 2 for v in values) / (k - 1))
    h = float(stats.t.ppf(0.975, k - 1)) * sd / math.sqrt(k)
    return m - h, m + h


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def evaluate_claims(claims: list[Claim], seeds: list[int], quick: bool, store: Store,
                    skipped: dict[str, str]) -> dict[str, Any]:
    """``reproduce.json``'s content: one entry per comparison of each claim, values read from
    the store's rows (the claims' cells are looked up by their config hash)."""
    rows = {r["key"]: r for r in store.rows()}
    curves = store.curves()
    entries = []
    for claim in claims:
        for comp in claim.comparisons:
            entry: dict[str, Any] = {
                "id": f"{claim.id}.{comp.suffix}" if comp.suffix else claim.id,
                "claim": claim.id, "source": claim.source, "paper_result": claim.paper_result,
                "setup": claim.setup, "metric": comp.metric, "lower_is_better": comp.lower_is_better,
                "rule": comp.rule, "direction": comp.direction, "seeds": list(seeds),
                "cells": {}, "arms": {}, "intervals": {}, "differences": [], "d": None, "se": None,
            }
            entries.append(entry)
            if claim.id in skipped:
                entry["verdict"] = f"not run: {skipped[claim.id]}"
                continue
            missing = 0
            raw: dict[str, list[float]] = {}
            for name in comp.arms:
                arm = claim.arm(name)
                keys = [claim.cell(arm, s, quick).key() for s in seeds]
                entry["cells"][name] = keys
                raw[name] = [arm_value(comp, rows[k], curves.get(k, [])) if k in rows else math.nan for k in keys]
                entry["arms"][name] = [_finite(v) for v in raw[name]]
                missing += sum(k not in rows for k in keys)
            entry["fields"] = {n: _summary(claim, claim.arm(n), quick) for n in comp.arms}
            if missing:
                entry["verdict"] = f"not run: {missing} cell(s) failed or missing from the store"
                continue
            diffs = [comp.diff({n: raw[n][i] for n in comp.arms}) for i in range(len(seeds))]
            d, se = paired_stats(diffs)
            entry["differences"] = [_finite(x) for x in diffs]
            entry["d"], entry["se"] = _finite(d), _finite(se)
            entry["verdict"] = verdict(d, se, comp.rule)
            sizes = {rows[k]["val_size"] for keys in entry["cells"].values() for k in keys}
            note = same_difference_note(diffs, comp.rule, sizes.pop() if len(sizes) == 1 and comp.metric ==
                                        "validation error" and comp.curve_target is None else None)
            if note:
                entry["note"] = note
            for name in comp.arms:
                vals = raw[name]
                entry["intervals"][name] = ([math.fsum(vals) / len(vals), *_interval(vals)]
                                            if all(math.isfinite(v) for v in vals) else None)
    ran = {k for e in entries for keys in e["cells"].values() for k in keys if k in rows}
    cell_s = math.fsum(rows[k]["wall_s"] for k in ran)
    return {"rule": RULE_TEXT, "quick": quick, "seeds": list(seeds), "cells": len(ran),
            "cell_wall_s": round(cell_s, 1), "claims": entries}


def same_difference_note(diffs: list[float], rule: str, val_size: int | None = None) -> str | None:
    """The report's note when every seed gave the same paired difference (to rounding), so
    se = 0; None otherwise. ``val_size``: the metric is an error rate over that many validation
    examples, so it moves in whole examples (d is given in examples too). Arms that compute
    the same thing up to floating-point rounding land here: a difference of 0 or +-1 example on
    every seed."""
    if len(diffs) < 2 or not all(math.isfinite(x) for x in diffs):
        return None
    d = math.fsum(diffs) / len(diffs)
    if max(diffs) - min(diffs) > 1e-12 * max(1.0, abs(d)):
        return None
    text = "every seed gave the same difference (se = 0)"
    if val_size:
        text += f", {d * val_size:+.0f} of {val_size} validation examples"
    return text + ": the rule then reads d alone" + (", and a within claim needs d = 0 exactly" if rule == "within"
                                                     else "")


def _summary(claim: Claim, arm: Any, quick: bool) -> str:
    kw = claim.fields(arm, quick)
    c = CellConfig(seed=0, **kw)
    parts = [c.task, c.norm, f"batch {c.batch_size}" + (f"x{c.nproc} ({'sync' if c.sync else 'local'})"
                                                        if c.nproc > 1 else ""),
             f"{c.epochs} ep", f"lr {c.lr:g}"]
    if c.train_subset:
        parts.append(f"train {c.train_subset}")
    return ", ".join(parts)
