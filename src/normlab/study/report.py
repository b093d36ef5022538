"""The study report, rebuilt from the database alone: tables, plain-words findings, figures.
The report never trains.

Every statement is paired and sized by the data: per batch size, each norm's difference to
the most accurate one is a mean over seeds with its 95% paired t-interval (``stats``); two
norms closer than one validation example are not ranked; with fewer than 3 seeds the
intervals are said to be unknown. Cost comes from the cost pass (``cost``) when stored.

Stored strings (task and norm names, settings) are data, not markup: they are escaped in
report.md, and figure file names are derived from them by ``safe_name`` alone, so a report
writes inside ``out`` whatever the database holds.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

from .analysis import Cell, Standing, Study, batch_moves, load_studies, standings, studies_from_rows
from .stats import MIN_SEEDS, Paired

__all__ = ["Cell", "Study", "load_studies", "format_table", "format_costs", "recommendations", "sensitivity",
           "grid_status", "table_caption", "write_report", "safe_name", "md"]

_studies_from_rows = studies_from_rows  # the name earlier tests use


def md(text: object) -> str:
    """``text`` as literal markdown: markup characters backslash-escaped, HTML characters as
    entities, line breaks as spaces."""
    s = str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = re.sub(r"[\r\n\t\x00-\x1f\x7f]", " ", s)
    return re.sub(r"([\\`*_\[\]|~])", r"\\\1", s)


def safe_name(text: str, limit: int = 48) -> str:
    """A file-name stem made from a stored string: letters, digits, '-', '_' and '.' only,
    no leading dot, never empty, never a path."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")[:limit]
    return s or "study"


# -------------------------------------------------------------------- words
def _pts(st: Study, v: float) -> str:
    return f"{st.scale(v):.2f}" if st.metric == "error" else f"{v:.3g}"


def _unit(st: Study) -> str:
    return " points" if st.metric == "error" else ""


def _interval(st: Study, d: Paired) -> str:
    if not d.estimated:
        return f"{'+' if d.mean >= 0 else ''}{_pts(st, d.mean)}{_unit(st)}"
    return (f"{'+' if d.mean >= 0 else ''}{_pts(st, d.mean)}{_unit(st)}, 95% CI "
            f"[{_pts(st, d.low)}, {_pts(st, d.high)}]")  # type: ignore[arg-type]


def _resolution_words(st: Study) -> str:
    if st.metric != "error" or not st.val_size:
        return ""
    return (f"{st.val_size} validation examples: one example is worth {100 / st.val_size:.3g} points of error, "
            "and norms closer than that are not ranked")


def grid_status(st: Study) -> str | None:
    """A warning when the study's grid is incomplete; None when every planned run is stored."""
    have, want = st.planned()
    if have >= want:
        return None
    return (f"INCOMPLETE GRID: {have} of {want} runs stored ({want - have} missing); the comparisons below use "
            "the seeds each pair has in common. Run the same command again to finish it.")


def _cell_text(st: Study, s: Standing | None, c: Cell | None) -> str:
    if c is None:
        return "-"
    if s is None or s.verdict == "diverged":
        return f"diverged {c.diverged}/{c.n}" if c.diverged else "-"
    v = _pts(st, c.mean)
    if s.verdict == "best":
        return v + " best"
    d = s.diff
    assert d is not None
    delta = f"{'+' if d.mean >= 0 else ''}{_pts(st, d.mean)}"
    if d.estimated and d.half_width is not None:
        delta += f"±{_pts(st, d.half_width)}"
    mark = {"worse": " *", "tied": " =", "close": " ~", "within": "", "unknown": ""}[s.verdict]
    return f"{v} {delta}{mark}"


def _grid(head: list[str], body: list[list[str]], markdown: bool) -> str:
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in body])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths)] + [fmt(r) for r in body])


def _bs_head(st: Study, b: int) -> str:
    nproc = int(st.protocol.get("nproc") or 1)
    return f"bs {b}" + (f" ({b // nproc}/proc)" if nproc > 1 else "")


def format_table(st: Study, markdown: bool = False) -> str:
    """Rows: norms; per batch size: the mean metric over seeds and the paired difference to
    the best norm there with its 95% interval half-width (* beyond it, = within one example)."""
    bss = st.batch_sizes
    by_bs = {b: {s.cell.norm: s for s in standings(st, b)} for b in bss}
    body = []
    for n in st.norms:
        name = md(n) if markdown else n
        esc = md if markdown else str
        body.append([name] + [esc(_cell_text(st, by_bs[b].get(n), st.cells.get((n, b)))) for b in bss]
                    + [f"{next(st.cells[(n, b)] for b in bss if (n, b) in st.cells).params:,}"])
    return _grid(["norm"] + [_bs_head(st, b) for b in bss] + ["params"], body, markdown)


def format_costs(st: Study, markdown: bool = False) -> str:
    """Rows: norms; per batch size: ms per training step and KiB saved for backward per sample."""
    bss = st.batch_sizes
    body = []
    for n in st.norms:
        row = [md(n) if markdown else n]
        row += [f"{1e3 * st.step_s(n, b):.2f}" if (n, b) in st.cells else "-" for b in bss]
        row += [f"{st.saved_bytes(n, b) / 1024:.1f}" if (n, b) in st.cells else "-" for b in bss]
        body.append(row)
    head = ["norm"] + [f"ms/step {b}" for b in bss] + [f"KiB/sample {b}" for b in bss]
    return _grid(head, body, markdown)


def _margin_words(st: Study) -> str:
    return f"{_pts(st, st.margin(0.0))}{_unit(st)}" if st.metric == "error" else "5% of the best value"


def table_caption(st: Study) -> str:
    k = st.seeds
    what = f"{st.unit}, mean over {k} seed{'s' if k != 1 else ''}"
    if k >= MIN_SEEDS:
        diff = ("then the paired difference to the best norm at that batch size ± the half-width of its 95% "
                "t-interval; * worse beyond the interval; ~ as good (the interval includes zero and ends within "
                f"the margin, {_margin_words(st)}); = within one validation example of the best "
                "(not ranked); no mark: not distinguishable, too uncertain to call")
    else:
        diff = (f"then the difference to the best norm at that batch size; with {k} seed{'s' if k != 1 else ''} "
                f"its interval cannot be estimated (it takes {MIN_SEEDS} or more), so no difference is shown as real")
    res = _resolution_words(st)
    return f"{st.title()}\n{what}; {diff}." + (f" {res[0].upper()}{res[1:]}." if res else "")


def _names(cells: list[Standing], st: Study, with_diff: bool = True, nm: Any = str) -> str:
    parts = [f"{nm(c.cell.norm)} ({_interval(st, c.diff)})" if with_diff and c.diff else nm(c.cell.norm) for c in cells]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def recommendations(st: Study, markdown: bool = False) -> list[str]:
    """One paragraph per batch size: the most accurate norm, which others cannot be told
    apart from it (and the cheapest of those), which are worse beyond their interval."""
    b_ = (lambda s: f"**{md(s)}**") if markdown else (lambda s: s)
    nm = md if markdown else str
    out = []
    for b in st.batch_sizes:
        ss = standings(st, b)
        head = f"Batch size {b}: "
        if not ss or ss[0].verdict != "best":
            out.append(head + "every norm diverged; no recommendation.")
            continue
        best = ss[0]
        tied = [s for s in ss if s.verdict == "tied"]
        close = [s for s in ss if s.verdict == "close"]
        unclear = [s for s in ss if s.verdict in ("within", "unknown")]
        worse = [s for s in ss if s.verdict == "worse"]
        diverged = [s for s in ss if s.verdict == "diverged"]
        c = best.cell
        text = head + f"the lowest mean {st.unit} is {b_(c.norm)} ({_pts(st, c.mean)}, {len(c.values)} seeds)."
        if tied:
            text += f" {_names(tied, st, False, nm)} {'is' if len(tied) == 1 else 'are'} within one validation example of it: equally accurate at this resolution."
        if st.seeds < MIN_SEEDS and len(ss) > 1:
            text += (f" With fewer than {MIN_SEEDS} seeds the intervals cannot be estimated, so the order of the "
                     f"others may be chance: run --seeds {MIN_SEEDS} or more before relying on it.")
        margin = f"{_pts(st, st.margin(c.mean))}{_unit(st)}"
        if close:
            text += (f" As good as far as the data show (the 95% interval of the difference includes zero and ends "
                     f"within {margin}): {_names(close, st, nm=nm)}.")
        if unclear and st.seeds >= MIN_SEEDS:
            text += (f" Not distinguishable from it, but the interval is too wide to call {'it' if len(unclear) == 1 else 'them'} "
                     f"as good (it reaches beyond {margin}): {_names(unclear, st, nm=nm)}.")
        near = [best] + tied + close
        if len(near) > 1:
            cheap = min(near, key=lambda s: st.step_s(s.cell.norm, b))
            if cheap is best:
                text += (f" It is also the cheapest of the norms as good as it "
                         f"({1e3 * st.step_s(c.norm, b):.2f} ms per step).")
            else:
                text += (f" Of the norms as good as it, the cheapest is {b_(cheap.cell.norm)} "
                         f"({1e3 * st.step_s(cheap.cell.norm, b):.2f} ms per step, vs "
                         f"{1e3 * st.step_s(c.norm, b):.2f}).")
        if worse:
            text += f" Worse beyond the interval: {_names(worse, st, nm=nm)}."
        if diverged:
            text += " Diverged: " + ", ".join(f"{nm(s.cell.norm)} ({s.cell.diverged} of {s.cell.n} seeds)"
                                                for s in diverged) + "."
        out.append(text)
    return out


def sensitivity(st: Study) -> list[str]:
    """Per norm, in plain words: the paired change of its metric from the largest batch size
    to the smallest, with its 95% interval and whether it depends on the batch size."""
    bss = st.batch_sizes
    if len(bss) < 2:
        return []
    lo, hi = bss[0], bss[-1]
    words = {"depends": "depends on the batch size", "steady": "not shown to depend on it: the interval includes zero or the change is under one example",
             "unknown": f"interval cannot be estimated with fewer than {MIN_SEEDS} seeds"}
    items = []
    for n, d, verdict in batch_moves(st):
        if d is None:
            items.append(f"- {n}: diverged at batch {lo} or {hi}")
            continue
        a, b = st.cells[(n, lo)], st.cells[(n, hi)]
        items.append(f"- {n}: {_pts(st, b.mean)} at batch {hi} → {_pts(st, a.mean)} at batch {lo} "
                     f"({_interval(st, d)}; {words[verdict]})")
    return items


def sensitivity_summary(st: Study) -> str:
    moves = batch_moves(st)
    dep = [n for n, _, v in moves if v == "depends"]
    steady = [n for n, _, v in moves if v == "steady"]
    if not dep and not steady:
        return ""
    return (f"Depends on the batch size: {', '.join(dep) or 'none'}. "
            f"No dependence found (within the interval and the resolution): {', '.join(steady) or 'none'}.")


# -------------------------------------------------------------------- report
def _settings(protocol: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(protocol.items()) if k != "task" and v != "")


def _inside(out: Path, name: str) -> Path:
    path = out / name
    if path.resolve().parent != out.resolve():  # safe_name makes this impossible; a second lock
        raise ValueError(f"refusing to write {path} outside {out}")
    return path


def write_report(db: str | Path, out: str | Path, keys: Iterable[str] | None = None) -> Path:
    """Write ``report.md`` and its PNG figures into ``out`` (and nowhere else) from the
    database ``db``; returns the path of ``report.md``."""
    from .plots import plot_curves, plot_diff_to_best, plot_error_vs_batch, plot_error_vs_time

    studies = load_studies(db, keys)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# normlab study report", "",
             f"Rebuilt from {md(db)} ({sum(c.n for s in studies for c in s.cells.values())} runs). "
             "Each run: the same number of epochs at every batch size, learning rate scaled with the batch "
             "size from a base value, evaluation in each norm's eval mode at a fixed evaluation batch size. "
             "Runs with the same seed share the validation split, the initialisation of the layers the norms "
             "share and the batch order, so norms are compared seed by seed (paired).", ""]
    warnings = [(st, grid_status(st)) for st in studies]
    lines += [f"> **{md(st.task)}: {w}**\n" for st, w in warnings if w]
    if not studies:
        lines.append("The database holds no finished runs yet.")
    used: set[str] = set()
    for i, st in enumerate(studies):
        tag = safe_name(st.task)
        if tag in used or sum(s.task == st.task for s in studies) > 1:
            tag = f"{tag}-{i + 1}"
        used.add(tag)
        figs = {
            "diff": plot_diff_to_best(st, _inside(out, f"{tag}_diff_to_best.png")),
            "batch": plot_error_vs_batch(st, _inside(out, f"{tag}_error_vs_batch.png")),
            "time": plot_error_vs_time(st, _inside(out, f"{tag}_error_vs_time.png")),
            "curves": plot_curves(st, _inside(out, f"{tag}_curves.png")),
        }
        lines += [f"## {md(st.title())}", ""]
        if grid_status(st):
            lines += [f"**{grid_status(st)}**", ""]
        lines += [f"Settings: {md(_settings(st.protocol))}.", ""]
        for name, value in sorted(st.notes.items()):
            if name != "grid" and isinstance(value, str):
                lines += [f"{md(name)}: {md(value)}", ""]
        lines += [md(table_caption(st).split("\n", 1)[1]), "", format_table(st, markdown=True), "",
                  "### Recommendation", ""]
        lines += [r + "\n" for r in recommendations(st, markdown=True)]
        moves = sensitivity(st)
        if moves:
            lines += ["### What happens when the batch size changes", "",
                      f"Per norm, the change of its {st.unit} from the largest batch size to the smallest, paired "
                      "by seed, with its 95% interval (largest change first). Every batch size trains the same "
                      "number of epochs, so a smaller batch takes more steps; on a small data set that alone can "
                      "favour small batches for every norm: read a norm's change against the others'.", ""]
            lines += [md(m) for m in moves] + [""]
            summary = sensitivity_summary(st)
            if summary:
                lines += [md(summary), ""]
        lines += ["### Cost", "", f"Step time: {md(st.cost_source)}. Saved bytes: what autograd keeps for "
                  "backward per sample (parameters excluded), at each batch size.", "",
                  format_costs(st, markdown=True), "",
                  "### Figures", "",
                  "Difference to the best norm at each batch size (95% paired interval; grey band: one "
                  "validation example):", "", f"![difference to the best]({figs['diff'].name})", "",
                  f"{st.unit.capitalize()} against batch size, one panel per norm (the others in grey; bars: 95% "
                  "t-interval of the mean over seeds):", "", f"![error vs batch size]({figs['batch'].name})", "",
                  "Accuracy against step time (cost pass), one panel per batch size; the Pareto front (no norm both "
                  "faster and more accurate) is labelled and joined, the rest in grey:", "",
                  f"![error vs step time]({figs['time'].name})", "",
                  "Learning curves at every batch size (validation metric in eval mode, mean over seeds; the three "
                  "best norms at that batch size in colour, the others grey):", "",
                  f"![learning curves]({figs['curves'].name})", ""]
    path = _inside(out, "report.md")
    path.write_text("\n".join(lines))
    return path
