"""What the stored runs say: runs grouped into studies, each norm's standing against the
best one per batch size (paired over seeds, ``stats``), and how each norm's metric moves
with the batch size. Plain data; ``report`` puts it into words, ``plots`` into figures.

A study is every run that shares the protocol (``CellConfig.study_key``: every config field
but the norm, batch size, seed, thread count and data folder), so one database may hold
several tasks, models or protocols, each its own study.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path
from typing import Any, Iterable

from .config import NOT_PROTOCOL, CellConfig
from .stats import MIN_SEEDS, Paired, paired_difference
from .store import Store

__all__ = ["Cell", "Study", "Standing", "load_studies", "standings", "batch_moves", "studies_from_rows"]


@dataclass
class Cell:
    """One (norm, batch size) over its seeds."""

    norm: str
    batch_size: int
    by_seed: dict[int, float]  # the metric of each finished, non-diverged seed
    diverged: int
    step_s: float  # median over seeds of the median step time during training
    saved_bytes: float  # per sample, mean over seeds
    params: int
    curves: list[list[tuple[float, float | None, float | None]]]

    @property
    def values(self) -> list[float]:
        return list(self.by_seed.values())

    @property
    def n(self) -> int:
        return len(self.by_seed) + self.diverged

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else math.nan

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else math.nan

    @property
    def usable(self) -> bool:
        return bool(self.values) and self.diverged == 0


@dataclass
class Study:
    """Runs that share a protocol: one task, one set of training settings."""

    protocol: dict[str, Any]
    cells: dict[tuple[str, int], Cell]
    metric: str
    key: str = ""
    val_size: int = 0
    seed_ids: list[int] = field(default_factory=list)
    costs: dict[tuple[str, int], tuple[float, float, int]] = field(default_factory=dict)  # the cost pass
    notes: dict[str, Any] = field(default_factory=dict)
    runs: set[tuple[str, int, int]] = field(default_factory=set)  # (norm, batch size, seed) stored, diverged too

    @property
    def task(self) -> str:
        return str(self.protocol["task"])

    @property
    def norms(self) -> list[str]:
        return sorted({n for n, _ in self.cells}, key=lambda s: (s == "none", s))

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({b for _, b in self.cells})

    @property
    def seeds(self) -> int:
        return max(c.n for c in self.cells.values())

    def title(self) -> str:
        p = self.protocol
        lr = f"lr {p['base_lr']:g} at batch {p['base_batch']}, {p['lr_rule']} scaling, {p['schedule']} decay"
        sub = f", train subset {p['train_subset']}" if p.get("train_subset") else ""
        if int(p.get("nproc") or 1) > 1:  # bs columns are global batches of nproc x the per-process batch
            stats = "synchronized" if p.get("sync") else "local"
            sub += f", {p['nproc']} processes (DDP), batch statistics {stats}"
        epochs = f"{p['epochs']} epoch{'s' if p['epochs'] != 1 else ''}"
        width = "" if p.get("fingerprint") else f", width {p['width']}"
        return f"{self.task}: {epochs}, {lr}{width}{sub}"

    def scale(self, v: float) -> float:
        """Metric as shown: error in percent, anything else as is."""
        return 100 * v if self.metric == "error" else v

    @property
    def unit(self) -> str:
        return {"error": "validation error (%)", "rmse": "validation RMSE"}.get(self.metric, f"validation {self.metric}")

    @property
    def resolution(self) -> float:
        """What one validation example is worth in the metric (error rate only; 0 otherwise):
        two norms closer than this are not ranked."""
        return 1.0 / self.val_size if self.metric == "error" and self.val_size else 0.0

    def margin(self, best: float) -> float:
        """How much worse than the best a norm may be and still count as as good (its 95%
        interval's upper end): 1 point of error (or one example, if more), else 5% of the
        best value. A one-sided equivalence bound (Schuirmann 1987) at a stated margin."""
        if self.metric == "error":
            return max(0.01, self.resolution)
        return 0.05 * abs(best)

    def step_s(self, norm: str, bs: int) -> float:
        """Seconds per training step: the cost pass if it measured this cell, else the median
        during training."""
        if (norm, bs) in self.costs:
            return self.costs[(norm, bs)][0]
        return self.cells[(norm, bs)].step_s

    def saved_bytes(self, norm: str, bs: int) -> float:
        if (norm, bs) in self.costs:
            return self.costs[(norm, bs)][1]
        return self.cells[(norm, bs)].saved_bytes

    @property
    def cost_source(self) -> str:
        if self.costs and all(k in self.costs for k in self.cells):
            threads = {t for _, _, t in self.costs.values()}
            return (f"cost pass after training: every norm timed in one process, alternating, "
                    f"{'/'.join(map(str, sorted(threads)))} thread{'s' if threads != {1} else ''}")
        return "median step time during training (no cost pass stored: machine load may have moved it)"

    def planned(self) -> tuple[int, int]:
        """(runs stored, runs planned): the plan stored by ``study``/``compare``, or else every
        norm x batch size x seed seen in this study."""
        grid = self.notes.get("grid") if isinstance(self.notes.get("grid"), dict) else None
        if grid:
            try:
                want = set(product(map(str, grid["norms"]), map(int, grid["batch_sizes"]), map(int, grid["seeds"])))
            except (KeyError, TypeError, ValueError):
                grid = None
        if not grid:
            want = set(product(self.norms, self.batch_sizes, self.seed_ids))
        return len(want & self.runs), len(want)


def studies_from_rows(rows: list[dict[str, Any]], curves: dict[str, list],
                      costs: dict[str, dict] | None = None, notes: dict[str, dict] | None = None) -> list[Study]:
    groups: dict[str, list[dict[str, Any]]] = {}
    protos: dict[str, dict[str, Any]] = {}
    for r in rows:
        cfg = CellConfig.from_row(r)
        k = cfg.study_key()
        groups.setdefault(k, []).append(r)
        protos[k] = {f: v for f, v in cfg.to_dict().items() if f not in NOT_PROTOCOL}
    studies = []
    for k, rs in groups.items():
        by_cell: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in rs:
            by_cell.setdefault((str(r["norm"]), int(r["global_batch_size"])), []).append(r)
        cells = {}
        for (norm, bs), cr in by_cell.items():
            ok = [r for r in cr if r["status"] == "ok" and r["val_metric"] is not None]
            cells[(norm, bs)] = Cell(
                norm=norm, batch_size=bs, by_seed={int(r["seed"]): float(r["val_metric"]) for r in ok},
                diverged=len(cr) - len(ok), step_s=statistics.median(r["median_step_s"] for r in cr),
                saved_bytes=statistics.fmean(r["saved_bytes_per_sample"] for r in cr),
                params=int(cr[0]["param_count"]), curves=[curves.get(r["key"], []) for r in ok])
        val_size = max((int(r["val_size"]) for r in rs if r.get("val_size")), default=0)
        st = Study(protos[k], cells, str(rs[0]["metric"]), key=k, val_size=val_size,
                   seed_ids=sorted({int(r["seed"]) for r in rs}), costs=(costs or {}).get(k, {}),
                   notes=(notes or {}).get(k, {}),
                   runs={(str(r["norm"]), int(r["global_batch_size"]), int(r["seed"])) for r in rs})
        studies.append(st)
    studies.sort(key=lambda s: (s.task, str(sorted(s.protocol.items()))))
    return studies


def load_studies(db: str | Path, keys: Iterable[str] | None = None) -> list[Study]:
    """The studies in a database (all runs, or only those with ``keys``)."""
    from .tables import read_costs, read_notes

    with Store(db, readonly=True) as store:
        return studies_from_rows(store.rows(keys), store.curves(), read_costs(store), read_notes(store))


@dataclass(frozen=True)
class Standing:
    """A norm at one batch size against the most accurate one there.

    ``verdict``: "best"; "tied" (closer to the best than one validation example: not
    ranked); "worse" (the paired interval excludes zero and the difference is at least one
    example); "close" (the interval includes zero and its upper end is within the study's
    margin, ``Study.margin``: as good as the best as far as the data show); "within" (the
    interval includes zero but is too wide to call it as good); "unknown" (fewer than ``MIN_SEEDS``
    paired seeds: no interval); "diverged"."""

    cell: Cell
    diff: Paired | None
    verdict: str


def standings(st: Study, bs: int) -> list[Standing]:
    """Every norm at batch size ``bs``, best first: its paired difference to the best."""
    cells = [st.cells[(n, bs)] for n in st.norms if (n, bs) in st.cells]
    usable = sorted((c for c in cells if c.usable), key=lambda c: c.mean)
    out = []
    if usable:
        best = usable[0]
        out.append(Standing(best, None, "best"))
        for c in usable[1:]:
            d = paired_difference(c.by_seed, best.by_seed)
            if abs(d.mean) < st.resolution:
                verdict = "tied"
            elif d.n < MIN_SEEDS:
                verdict = "unknown"
            else:
                verdict = ("worse" if d.beyond(st.resolution) else
                           "close" if d.high is not None and d.high <= st.margin(best.mean) else "within")
            out.append(Standing(c, d, verdict))
    out += [Standing(c, None, "diverged") for c in cells if not c.usable]
    return out


def batch_moves(st: Study) -> list[tuple[str, Paired | None, str]]:
    """Per norm: the paired change of its metric from the largest batch size to the smallest
    (``metric(smallest) - metric(largest)`` per seed) and a verdict: "depends" (the interval
    excludes zero by at least one example), "steady" (it does not), "unknown" (fewer than
    ``MIN_SEEDS`` seeds), "diverged" (at either end). Largest change first."""
    bss = st.batch_sizes
    if len(bss) < 2:
        return []
    lo, hi = bss[0], bss[-1]
    out: list[tuple[str, Paired | None, str]] = []
    for n in st.norms:
        a, b = st.cells.get((n, lo)), st.cells.get((n, hi))
        if a is None or b is None or not a.usable or not b.usable:
            out.append((n, None, "diverged"))
            continue
        d = paired_difference(a.by_seed, b.by_seed)
        verdict = "unknown" if not d.estimated else "depends" if d.beyond(st.resolution) else "steady"
        out.append((n, d, verdict))
    return sorted(out, key=lambda t: -(t[1].mean if t[1] is not None and not math.isnan(t[1].mean) else math.inf))
