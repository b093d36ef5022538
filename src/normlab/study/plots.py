"""The study report's figures (matplotlib, Agg backend): error vs batch size, error vs step
time with the Pareto front, learning curves."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .report import Study

__all__ = ["plot_error_vs_batch", "plot_error_vs_time", "plot_curves", "pareto_front"]

_STYLES = ["-", "--", "-.", ":"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p"]


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _style(i: int) -> dict[str, Any]:
    """Colour, line style and marker of the i-th norm (the dark tab20 shades first)."""
    colors = _plt().get_cmap("tab20").colors
    order = list(range(0, 20, 2)) + list(range(1, 20, 2))
    return {"color": colors[order[i % 20]], "linestyle": _STYLES[i % len(_STYLES)], "marker": _MARKERS[i % len(_MARKERS)]}


def _log_y(ax: Any) -> None:
    """Log y axis with plain tick labels (1, 2, 5, 10, ...): small errors stay readable
    next to a norm that fails."""
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


def plot_error_vs_batch(st: "Study", path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.8, 5.5))
    for i, n in enumerate(st.norms):
        cells = [st.cells[(n, b)] for b in st.batch_sizes if (n, b) in st.cells and st.cells[(n, b)].values]
        if not cells:
            continue
        xs = [c.batch_size for c in cells]
        ys = [st.scale(c.mean) for c in cells]
        sd = [0.0 if math.isnan(c.std) else st.scale(c.std) for c in cells]
        kw = _style(i)
        ax.plot(xs, ys, label=n, markersize=5, **kw)
        ax.fill_between(xs, [y - s for y, s in zip(ys, sd)], [y + s for y, s in zip(ys, sd)],
                        color=kw["color"], alpha=0.12, linewidth=0)
        div = [c.batch_size for c in cells if c.diverged]
        if div:
            ax.scatter(div, [st.scale(st.cells[(n, b)].mean) for b in div], marker="x", s=80, color="k", zorder=5)
    ax.set_xscale("log", base=2)
    ax.set_xticks(st.batch_sizes, [str(b) for b in st.batch_sizes])
    if st.metric == "error":
        _log_y(ax)
    ax.set_xlabel("batch size (per process)")
    ax.set_ylabel(st.unit)
    seeds = f"mean ± 1 std over {st.seeds} seeds" if st.seeds > 1 else "one seed"
    ax.set_title(f"{st.task}: {st.unit} vs batch size ({seeds})", fontsize=10)
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_error_vs_time(st: "Study", path: Path) -> Path:
    plt = _plt()
    bss = st.batch_sizes
    cols = min(3, len(bss))
    rows = math.ceil(len(bss) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.8 * rows), squeeze=False)
    for k, b in enumerate(bss):
        ax = axes[k // cols][k % cols]
        pts, names = [], []
        for i, n in enumerate(st.norms):
            c = st.cells.get((n, b))
            if c is None or not c.usable:
                continue
            x, y = 1e3 * c.step_s, st.scale(c.mean)
            kw = _style(i)
            ax.scatter([x], [y], color=kw["color"], marker=kw["marker"], s=36, zorder=3)
            ax.annotate(n, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=7)
            pts.append((x, y))
            names.append(n)
        front = pareto_front(pts)
        if front:
            ax.plot([pts[i][0] for i in front], [pts[i][1] for i in front], color="k", linewidth=1,
                    linestyle="--", zorder=2, label="Pareto front")
            ax.scatter([pts[i][0] for i in front], [pts[i][1] for i in front], s=110, facecolors="none",
                       edgecolors="k", zorder=4)
            ax.legend(fontsize=7, loc="upper right")
        ax.set_title(f"batch size {b}", fontsize=9)
        ax.set_xlabel("median training-step time (ms)", fontsize=8)
        ax.set_ylabel(st.unit, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, alpha=0.3)
    for k in range(len(bss), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"{st.task}: accuracy vs compute (circled: Pareto front)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
    plt = _plt()
    bss = st.batch_sizes
    shown = sorted({bss[0], bss[len(bss) // 2], bss[-1]})
    fig, axes = plt.subplots(1, len(shown), figsize=(4.8 * len(shown), 4.2), squeeze=False, sharey=True)
    for k, b in enumerate(shown):
        ax = axes[0][k]
        for i, n in enumerate(st.norms):
            c = st.cells.get((n, b))
            if c is None or not c.curves:
                continue
            xs, ys = _mean_curve(c.curves)
            kw = _style(i)
            ax.plot(xs, [st.scale(y) for y in ys], label=n, color=kw["color"], linestyle=kw["linestyle"],
                    linewidth=1.3)
        ax.set_title(f"batch size {b}", fontsize=9)
        ax.set_xlabel("epoch", fontsize=8)
        if k == 0:
            ax.set_ylabel(st.unit, fontsize=8)
        if st.metric == "error":  # the late, small errors matter
            _log_y(ax)
        ax.grid(True, alpha=0.3, which="both")
        ax.tick_params(labelsize=7)
    axes[0][-1].legend(fontsize=7, ncol=2, loc="upper right")
    fig.suptitle(f"{st.task}: learning curves (eval mode, mean over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
