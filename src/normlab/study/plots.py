"""The study report's figures (matplotlib, Agg backend), readable with every norm: the
difference to the best norm per batch size with its paired interval; error against batch
size as small multiples (each norm in colour over the others in grey); error against step
time with only the Pareto front labelled; learning curves at every batch size with the
three best norms there in colour. No figure places free text labels that can overlap."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .stats import t_quantile

if TYPE_CHECKING:
    from .analysis import Study

__all__ = ["plot_diff_to_best", "plot_error_vs_batch", "plot_error_vs_time", "plot_curves", "pareto_front"]

_GREY = "0.78"
_COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=100)
    _plt().close(fig)
    return path


def _norm_color(st: "Study", norm: str) -> Any:
    """One colour per norm, the same in every panel (tab10; norms past the tenth reuse a hue
    with a dashed line, ``_norm_dash``)."""
    return _plt().get_cmap("tab10").colors[st.norms.index(norm) % 10]


def _norm_dash(st: "Study", norm: str) -> str:
    return "-" if st.norms.index(norm) < 10 else "--"


def _log_y(ax: Any) -> None:
    """Log y axis with plain tick labels (1, 2, 5, 10, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both coordinates (both minimized),
    sorted by the first coordinate."""
    idx = []
    for i, (x, y) in enumerate(points):
        if not any((x2 <= x and y2 <= y) and (x2 < x or y2 < y) for j, (x2, y2) in enumerate(points) if j != i):
            idx.append(i)
    return sorted(idx, key=lambda i: points[i])


def _grid(n: int, cols: int, w: float, h: float, **kw: Any) -> tuple[Any, list[Any]]:
    cols = max(1, min(cols, n))
    rows = math.ceil(n / cols)
    fig, axes = _plt().subplots(rows, cols, figsize=(w * cols, h * rows), squeeze=False, **kw)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return fig, flat[:n]


def plot_diff_to_best(st: "Study", path: Path) -> Path:
    """One panel per batch size: each norm's paired difference to the best (points) with its
    95% interval, norms as rows (sorted), zero and one validation example marked."""
    from .analysis import standings

    bss = st.batch_sizes
    fig, axes = _grid(len(bss), 3, 4.4, 0.32 * len(st.norms) + 1.4, sharey=False)
    for ax, b in zip(axes, bss):
        ss = [s for s in standings(st, b) if s.verdict != "diverged"]
        ys = list(range(len(ss)))[::-1]
        for y, s in zip(ys, ss):
            d = s.diff
            x = 0.0 if d is None else st.scale(d.mean)
            color = {"best": "k", "worse": _COLORS[1], "tied": "0.45", "close": _COLORS[2], "within": _COLORS[0],
                     "unknown": "0.45"}[s.verdict]
            if d is not None and d.estimated:
                ax.plot([st.scale(d.low), st.scale(d.high)], [y, y], color=color, linewidth=2, alpha=0.7)
            ax.plot([x], [y], "o", color=color, markersize=5)
        ax.axvline(0, color="k", linewidth=0.8)
        if st.resolution:
            ax.axvspan(-st.scale(st.resolution), st.scale(st.resolution), color=_GREY, alpha=0.5, linewidth=0)
        ax.set_yticks(ys, [s.cell.norm for s in ss], fontsize=8)
        ax.set_title(f"batch size {b}", fontsize=9)
        ax.set_xlabel(f"difference to the best ({'points' if st.metric == 'error' else st.metric})", fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        ax.grid(True, axis="x", alpha=0.3)
    k = st.seeds
    sub = "95% paired t-interval over seeds" if k >= 3 else f"{k} seed(s): no interval"
    fig.suptitle(f"{st.task}: difference to the most accurate norm ({sub}; red: worse beyond it, green: "
                 "within the margin)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _mean_ci(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 3:
        return m, 0.0
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))
    return m, t_quantile(len(values) - 1) * sd / math.sqrt(len(values))


def plot_error_vs_batch(st: "Study", path: Path) -> Path:
    """Small multiples: one panel per norm, its mean metric against batch size with 95%
    t-interval bars, every other norm's line in grey behind it; shared axes."""
    bss = st.batch_sizes
    norms = st.norms
    fig, axes = _grid(len(norms), 4, 3.0, 2.5, sharex=True, sharey=True)
    lines = {}
    for n in norms:
        pts = [(b, st.cells[(n, b)]) for b in bss if (n, b) in st.cells and st.cells[(n, b)].values]
        lines[n] = [(b, *_mean_ci(c.values), bool(c.diverged)) for b, c in pts]
    for ax, n in zip(axes, norms):
        for other, pts in lines.items():
            if other != n and pts:
                ax.plot([p[0] for p in pts], [st.scale(p[1]) for p in pts], color=_GREY, linewidth=1, zorder=1)
        pts = lines[n]
        if pts:
            ax.errorbar([p[0] for p in pts], [st.scale(p[1]) for p in pts], yerr=[st.scale(p[2]) for p in pts],
                        color=_COLORS[0], marker="o", markersize=3.5, linewidth=1.6, capsize=2, zorder=3)
            div = [p for p in pts if p[3]]
            if div:
                ax.plot([p[0] for p in div], [st.scale(p[1]) for p in div], "x", color="k", markersize=7, zorder=4)
        ax.set_title(n, fontsize=9)
        ax.set_xscale("log", base=2)
        ax.set_xticks(bss, [str(b) for b in bss])
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3, which="both")
    if st.metric == "error":
        _log_y(axes[0])
    for ax in axes:
        if ax.get_subplotspec().is_first_col():
            ax.set_ylabel(st.unit, fontsize=8)
        if ax.get_subplotspec().is_last_row() or ax is axes[-1]:
            ax.set_xlabel("batch size", fontsize=8)
    k = st.seeds
    fig.suptitle(f"{st.task}: {st.unit} vs batch size (mean over {k} seed{'s' if k != 1 else ''}"
                 f"{'; bars: 95% t-interval' if k >= 3 else ''}; x: some seeds diverged)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_error_vs_time(st: "Study", path: Path) -> Path:
    """One panel per batch size: metric against step time; the Pareto front labelled (in a
    legend, so labels never overlap) and joined, the other norms grey."""
    bss = st.batch_sizes
    fig, axes = _grid(len(bss), 3, 4.6, 3.8)
    for ax, b in zip(axes, bss):
        pts, names = [], []
        for n in st.norms:
            c = st.cells.get((n, b))
            if c is not None and c.usable:
                pts.append((1e3 * st.step_s(n, b), st.scale(c.mean)))
                names.append(n)
        front = pareto_front(pts)
        ax.scatter([p[0] for i, p in enumerate(pts) if i not in front],
                   [p[1] for i, p in enumerate(pts) if i not in front], color=_GREY, s=25, zorder=2)
        ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="k", linewidth=0.8, linestyle="--",
                zorder=2)
        for i in front:
            ax.scatter([pts[i][0]], [pts[i][1]], color=_norm_color(st, names[i]), s=45, zorder=3, label=names[i],
                       marker="o" if _norm_dash(st, names[i]) == "-" else "s")
        if front:
            ax.legend(fontsize=7, loc="upper right", title="Pareto front", title_fontsize=7)
        ax.set_title(f"batch size {b}", fontsize=9)
        ax.set_xlabel("training-step time (ms, cost pass)", fontsize=8)
        ax.set_ylabel(st.unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"{st.task}: accuracy vs compute (grey: not on the front)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _mean_curve(curves: list[list[tuple[float, float | None, float | None]]]) -> tuple[list[float], list[float]]:
    n = min(len(c) for c in curves)
    xs, ys = [], []
    for p in range(n):
        vals = [c[p][2] for c in curves if c[p][2] is not None]
        if vals:
            xs.append(curves[0][p][0])
            ys.append(sum(vals) / len(vals))
    return xs, ys


def plot_curves(st: "Study", path: Path) -> Path:
    """Learning curves at every batch size studied, one panel each: the three norms with the
    lowest final mean there in colour (legend), the others grey."""
    bss = st.batch_sizes
    fig, axes = _grid(len(bss), 3, 4.4, 3.6, sharey=True)
    for ax, b in zip(axes, bss):
        cells = [st.cells[(n, b)] for n in st.norms if (n, b) in st.cells and st.cells[(n, b)].curves]
        top = sorted((c for c in cells if c.usable), key=lambda c: c.mean)[:3]
        for c in cells:
            if c not in top:
                xs, ys = _mean_curve(c.curves)
                ax.plot(xs, [st.scale(y) for y in ys], color=_GREY, linewidth=1, zorder=1)
        for c in top:  # a norm keeps its colour in every panel
            xs, ys = _mean_curve(c.curves)
            ax.plot(xs, [st.scale(y) for y in ys], color=_norm_color(st, c.norm), linestyle=_norm_dash(st, c.norm),
                    linewidth=1.6, label=c.norm, zorder=3)
        ax.set_title(f"batch size {b}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        ax.set_ylabel(st.unit, fontsize=8)
        if st.metric == "error":
            _log_y(ax)
        ax.grid(True, alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
        if top:
            ax.legend(fontsize=7, loc="upper right")
    fig.suptitle(f"{st.task}: learning curves (eval mode, mean over seeds; three best in colour)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
