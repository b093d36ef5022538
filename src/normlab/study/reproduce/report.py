"""``reproduce.md`` (the table and a figure per claim) and ``reproduce.json`` from the
evaluated claims (``run.evaluate_claims``). Writes only; never trains."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

__all__ = ["write_outputs", "format_table"]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def _arms_text(entry: dict[str, Any]) -> str:
    parts = []
    for name, iv in entry["intervals"].items():
        if iv is None:
            parts.append(f"{name}: {', '.join(_num(v) for v in entry['arms'][name])} (per seed)")
        else:
            parts.append(f"{name}: {iv[0]:.4g} [{iv[1]:.4g}, {iv[2]:.4g}]")
    return "<br>".join(parts) or "-"


def format_table(result: dict[str, Any]) -> str:
    """The markdown table: claim, source, paper's result, our setup, per-arm mean [95% interval
    over seeds], d +- se, verdict."""
    lines = ["| claim | source | paper's result | our setup | ours: mean [95% interval over seeds] | d (se) | verdict |",
             "|---|---|---|---|---|---|---|"]
    for e in result["claims"]:
        setup = e["setup"] + ". Metric: " + e["metric"] + ("" if e["lower_is_better"] else " (higher is better)") + \
            ". Direction: " + e["direction"]
        if e.get("fields"):
            setup += ". Cells: " + "; ".join(f"{n} = {f}" for n, f in e["fields"].items())
        d = "-" if e["d"] is None else f"{e['d']:.4g} ({_num(e['se'])})"
        verdict = f"**{e['verdict']}**" + (f" ({e['note']})" if e.get("note") else "")
        lines.append("| " + " | ".join(_cell(x) for x in (
            f"**{e['id']}**", e["source"], e["paper_result"], setup, _arms_text(e), d, verdict)) + " |")
    return "\n".join(lines)


def summary_table(result: dict[str, Any]) -> str:
    """A short table (id, per-arm means, d (se), verdict) for the terminal and the README."""
    lines = ["| claim | ours: mean per arm | d (se) | verdict |", "|---|---|---|---|"]
    for e in result["claims"]:
        arms = ", ".join(f"{n} {iv[0]:.3g}" if iv else f"{n} n/a" for n, iv in e["intervals"].items()) or "-"
        d = "-" if e["d"] is None else f"{e['d']:.3g} ({_num(e['se'])})"
        lines.append(f"| {e['id']} | {_cell(arms)} | {d} | {_cell(e['verdict'])} |")
    return "\n".join(lines)


def _figure(claim_id: str, entries: list[dict[str, Any]], path: Path) -> bool:
    """Per comparison: each arm's value per seed (a line joins one seed's arms) and the paired
    differences with d +- 2 se; False if nothing ran."""
    ran = [e for e in entries if e["d"] is not None]
    if not ran:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ran) + 1, figsize=(3.6 * (len(ran) + 1), 3.4), squeeze=False)
    for ax, e in zip(axes[0], ran):
        names = list(e["arms"])
        for i in range(len(e["seeds"])):
            ys = [e["arms"][n][i] for n in names]
            ax.plot(range(len(names)), [float("nan") if y is None else y for y in ys], "o-", color="0.6", lw=0.8,
                    ms=4)
        means = [e["intervals"][n][0] if e["intervals"].get(n) else float("nan") for n in names]
        ax.plot(range(len(names)), means, "s", color="C3", ms=8, label="mean")
        ax.set_xticks(range(len(names)), names, rotation=20, fontsize=8)
        ax.set_title(e["id"], fontsize=9)
        ax.set_ylabel(e["metric"], fontsize=8)
    ax = axes[0][-1]
    for j, e in enumerate(ran):
        diffs = [x for x in e["differences"] if x is not None]
        ax.plot([j] * len(diffs), diffs, "o", color="0.5", ms=4)
        se = e["se"] or 0.0
        ax.errorbar([j], [e["d"]], yerr=[2 * se], fmt="s", color="C0", capsize=5, ms=7)
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(ran)), [e["id"].split(".", 1)[-1] if "." in e["id"] else e["id"] for e in ran],
                  fontsize=8)
    ax.set_title("paired differences: d +- 2 se\n(> 0: the paper's side ahead)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write_outputs(result: dict[str, Any], out: str | Path, wall_s: float | None = None) -> Path:
    """Write reproduce.json, reproduce.md and one PNG per claim into ``out``; returns the .md path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "reproduce.json").write_text(json.dumps(result, indent=1, allow_nan=False) + "\n")
    by_claim: dict[str, list[dict[str, Any]]] = {}
    for e in result["claims"]:
        by_claim.setdefault(e["claim"], []).append(e)
    run = "quick" if result["quick"] else "full"
    lines = [f"# normlab reproduce ({run} run, seeds {', '.join(map(str, result['seeds']))})", "",
             "**Verdict rule** (the same for every claim, fixed before any run): " + result["rule"], ""]
    if wall_s is not None:
        lines += [f"Wall time of this invocation: {wall_s:.0f} s (cells already in the database are not rerun); "
                  f"the {result.get('cells', 0)} cells behind this report took {result.get('cell_wall_s', 0):.0f} s "
                  "of cell time in all (each cell's own wall time, summed over workers).", ""]
    lines += [format_table(result), "", "## Figures", ""]
    for cid, entries in by_claim.items():
        png = f"{_safe(cid)}.png"
        if _figure(cid, entries, out / png):
            lines += [f"### {cid}", "", f"![{cid}]({png})", ""]
        else:
            lines += [f"### {cid}", "", f"{entries[0]['verdict']}", ""]
    md = out / "reproduce.md"
    md.write_text("\n".join(lines))
    return md
