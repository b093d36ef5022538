"""The study report, rebuilt from the database alone: summary tables, figures, and a
recommendation per batch size. The report never trains.

Runs are grouped into studies by every config field except the norm, batch size and seed
(and the thread count and data folder, which do not change what is learned), so one
database may hold several tasks or protocols; each gets its own section and figures.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .store import Store

__all__ = ["Cell", "Study", "load_studies", "format_table", "recommendations", "sensitivity", "write_report"]

_NOT_PROTOCOL = {"key", "norm", "batch_size", "global_batch_size", "seed", "threads", "data_dir"}


@dataclass
class Cell:
    """One (norm, batch size) over its seeds."""

    norm: str
    batch_size: int
    values: list[float]  # the metric of each finished, non-diverged seed
    diverged: int
    step_s: float  # median over seeds of the median step time
    saved_bytes: float  # per sample, mean over seeds
    params: int
    curves: list[list[tuple[float, float | None, float | None]]]

    @property
    def n(self) -> int:
        return len(self.values) + self.diverged

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
        return f"{self.task}: {epochs}, {lr}, width {p['width']}{sub}"

    def scale(self, v: float) -> float:
        """Metric as shown: error in percent, RMSE as is."""
        return 100 * v if self.metric == "error" else v

    @property
    def unit(self) -> str:
        return "validation error (%)" if self.metric == "error" else "validation RMSE"


def _studies_from_rows(rows: list[dict[str, Any]], curves: dict[str, list]) -> list[Study]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        proto = tuple(sorted((k, r[k]) for k in r if k not in _NOT_PROTOCOL and k in _config_fields()))
        groups.setdefault(proto, []).append(r)
    studies = []
    for proto, rs in groups.items():
        by_cell: dict[tuple[str, int], list[dict[str, Any]]] = {}
        for r in rs:
            by_cell.setdefault((r["norm"], r["global_batch_size"]), []).append(r)
        cells = {}
        for (norm, bs), cr in by_cell.items():
            ok = [r for r in cr if r["status"] == "ok" and r["val_metric"] is not None]
            cells[(norm, bs)] = Cell(
                norm=norm, batch_size=bs, values=[r["val_metric"] for r in ok], diverged=len(cr) - len(ok),
                step_s=statistics.median(r["median_step_s"] for r in cr),
                saved_bytes=statistics.fmean(r["saved_bytes_per_sample"] for r in cr),
                params=int(cr[0]["param_count"]), curves=[curves.get(r["key"], []) for r in ok])
        studies.append(Study(dict(proto), cells, rs[0]["metric"]))
    studies.sort(key=lambda s: (s.task, str(sorted(s.protocol.items()))))
    return studies


def _config_fields() -> set[str]:
    from .config import CellConfig

    return set(CellConfig.field_types())


def load_studies(db: str | Path, keys: Iterable[str] | None = None) -> list[Study]:
    """The studies in a database (all runs, or only those with ``keys``)."""
    if not Path(db).is_file():
        raise FileNotFoundError(f"no study database at {db}")
    with Store(db) as store:
        return _studies_from_rows(store.rows(keys), store.curves())


# -------------------------------------------------------------------- tables
def _cell_text(study: Study, c: Cell | None) -> str:
    if c is None:
        return "-"
    if not c.values:
        return "diverged"
    v = f"{study.scale(c.mean):.2f}" if study.metric == "error" else f"{c.mean:.3g}"
    if len(c.values) > 1:
        v += f"±{study.scale(c.std):.2f}" if study.metric == "error" else f"±{c.std:.2g}"
    return v + ("†" if c.diverged else "")


def format_table(study: Study, markdown: bool = False) -> str:
    """Rows: norms; columns: the metric (mean±std over seeds) at each batch size, then the
    cost: parameters, bytes saved for backward per sample, step time at the largest batch."""
    bss = study.batch_sizes
    big = bss[-1]
    nproc = int(study.protocol.get("nproc") or 1)
    head = ["norm"] + [f"bs {b}" + (f" ({b // nproc}/proc)" if nproc > 1 else "") for b in bss] + ["params", "saved KiB/sample", f"ms/step @{big}"]
    body = []
    for n in study.norms:
        row = [n] + [_cell_text(study, study.cells.get((n, b))) for b in bss]
        ref = study.cells.get((n, big)) or next(study.cells[(n, b)] for b in bss if (n, b) in study.cells)
        row += [f"{ref.params:,}", f"{ref.saved_bytes / 1024:.1f}", f"{1e3 * ref.step_s:.2f}"]
        body.append(row)
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def table_caption(study: Study) -> str:
    what = "validation error in %" if study.metric == "error" else "validation RMSE (original units)"
    seeds = f"mean±std over {study.seeds} seeds" if study.seeds > 1 else "one seed"
    return (f"{study.title()}\n{what}, {seeds}; † some seeds diverged (mean over the rest); "
            "step time and saved bytes are medians/means over seeds")


# ------------------------------------------------------------ recommendation
def _fmt_metric(study: Study, c: Cell) -> str:
    if study.metric == "error":
        s = f"{study.scale(c.mean):.2f}% error"
        return s + (f" (± {study.scale(c.std):.2f})" if len(c.values) > 1 else "")
    return f"RMSE {c.mean:.3g}" + (f" (± {c.std:.2g})" if len(c.values) > 1 else "")


def _join(names: list[str]) -> str:
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def recommendations(study: Study) -> list[str]:
    """One plain-words paragraph per batch size: the most accurate norm, the cheapest norm
    (by step time) whose mean is within one standard deviation of it, and whether the
    differences are within noise."""
    out = []
    for b in study.batch_sizes:
        cells = [study.cells[(n, b)] for n in study.norms if (n, b) in study.cells]
        usable = [c for c in cells if c.usable]
        bad = [c for c in cells if not c.usable]
        if not usable:
            out.append(f"**Batch size {b}**: every norm diverged; no recommendation.")
            continue
        best = min(usable, key=lambda c: c.mean)
        text = f"**Batch size {b}**: the most accurate is **{best.norm}** ({_fmt_metric(study, best)}"
        text += f", {1e3 * best.step_s:.2f} ms per step)."
        if math.isnan(best.std):
            text += (" With one seed per cell there is no estimate of the noise, so this ranking may be"
                     " chance; run more seeds (--seeds) before relying on it.")
        else:
            near = [c for c in usable if c.mean <= best.mean + best.std]
            cheap = min(near, key=lambda c: c.step_s)
            if cheap is best:
                text += " It is also the cheapest norm within one standard deviation of its error."
            else:
                text += (f" The cheapest norm within one standard deviation of it is **{cheap.norm}** "
                         f"({_fmt_metric(study, cheap)}, {1e3 * cheap.step_s:.2f} ms per step).")
            others = [c.norm for c in near if c is not best]
            if others:
                text += (f" {_join(others)} {'is' if len(others) == 1 else 'are'} within one standard deviation of"
                         f" {best.norm}: at {study.seeds} seeds the differences among them are within noise.")
            else:
                text += " Every other norm is more than one standard deviation worse."
        if bad:
            text += " Diverged: " + ", ".join(f"{c.norm} ({c.diverged} of {c.n} seeds)" for c in bad) + "."
        out.append(text)
    return out


def sensitivity(study: Study) -> list[str]:
    """Per norm, in plain words: how its metric moves from the largest batch size to the
    smallest, and whether the move is beyond the seeds' noise (the two stds combined)."""
    bss = study.batch_sizes
    if len(bss) < 2:
        return []
    lo, hi = bss[0], bss[-1]
    unit = " points" if study.metric == "error" else ""
    items = []
    for n in study.norms:
        a, b = study.cells.get((n, lo)), study.cells.get((n, hi))
        if a is None or b is None or not a.usable or not b.usable:
            items.append((math.inf, f"- {n}: diverged at batch {lo if a is None or not a.usable else hi}"))
            continue
        d = study.scale(a.mean) - study.scale(b.mean)
        noise = math.hypot(study.scale(a.std), study.scale(b.std))
        verdict = ("one seed: noise unknown" if math.isnan(noise) else
                   "beyond noise" if abs(d) > noise else "within noise")
        items.append((d, f"- {n}: {study.scale(b.mean):.3g} at batch {hi} -> {study.scale(a.mean):.3g} at batch {lo} "
                         f"({d:+.2f}{unit}; {verdict})"))
    return [t for _, t in sorted(items, key=lambda it: -it[0])]


# -------------------------------------------------------------------- report
def _settings(protocol: dict[str, Any]) -> str:
    from .config import CellConfig

    types = CellConfig.field_types()
    return ", ".join(f"{k}={types[k](v) if k in types and v is not None else v}"
                     for k, v in sorted(protocol.items()) if k != "task")


def write_report(db: str | Path, out: str | Path, keys: Iterable[str] | None = None) -> Path:
    """Write ``report.md`` and its PNG figures into ``out`` from the database ``db``;
    returns the path of ``report.md``."""
    from .plots import plot_curves, plot_error_vs_batch, plot_error_vs_time

    studies = load_studies(db, keys)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# normlab study report", "",
             f"Rebuilt from `{db}` ({sum(c.n for s in studies for c in s.cells.values())} runs). "
             "Each run: the same number of epochs at every batch size, learning rate scaled with the batch "
             "size from a base value, evaluation in each norm's eval mode at a fixed evaluation batch size "
             "on a validation split fixed by the seed.", ""]
    if not studies:
        lines.append("The database holds no finished runs yet.")
    for i, st in enumerate(studies):
        tag = st.task if sum(s.task == st.task for s in studies) == 1 else f"{st.task}-{i + 1}"
        figs = {
            "batch": plot_error_vs_batch(st, out / f"{tag}_error_vs_batch.png"),
            "time": plot_error_vs_time(st, out / f"{tag}_error_vs_time.png"),
            "curves": plot_curves(st, out / f"{tag}_curves.png"),
        }
        p = st.protocol
        lines += [f"## {st.title()}", "",
                  f"Settings: {_settings(p)}.", "",
                  table_caption(st).split("\n", 1)[1] + ".", "", format_table(st, markdown=True), "",
                  "### Recommendation", ""]
        lines += [r + "\n" for r in recommendations(st)]
        moves = sensitivity(st)
        if moves:
            lines += [f"How each norm's {st.unit} moves from the largest batch size to the smallest "
                      "(worst first; noise: the two standard deviations combined). Every batch size trains "
                      "the same number of epochs, so a smaller batch takes more steps; on a small data set that "
                      "alone can favour small batches for every norm: read a norm's move against the others', "
                      "not against zero.", ""] + moves + [""]
        lines += ["### Figures", "",
                  f"{st.unit.capitalize()} against batch size (mean and band of ±1 std over seeds):", "",
                  f"![error vs batch size]({figs['batch'].name})", "",
                  "Accuracy against compute, one panel per batch size; the Pareto front (no norm both faster "
                  "and more accurate) is joined by a line:", "",
                  f"![error vs step time]({figs['time'].name})", "",
                  "Learning curves (validation metric in eval mode, mean over seeds):", "",
                  f"![learning curves]({figs['curves'].name})", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
