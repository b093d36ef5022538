"""``normlab bench``: its arguments, their validation (a clear message and exit code 2, no
traceback), the layer table, the legend of its columns and the warning when the machine was loaded.

Three modes: the layers on one input shape (default; :func:`normlab.bench.run_bench`),
``--small`` (per-call times on small inputs) and ``--model resnet|mlp|transformer`` (whole
training steps), the last two in :mod:`normlab.bench_models`.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

__all__ = ["add_parser", "format_table"]

DTYPES = ("float32", "float64", "bfloat16", "float16")

LEGEND = """columns: fwd ms = training forward; fwd+bwd ms = training forward and backward; eval ms = eval
forward (no grad); /native BN = fwd+bwd over torch's BatchNorm of the same dtype and layout; /counterpart =
over torch's own version of the same layer; limit frac = the memory limit (8 input-sized reads and writes at
the measured copy speed) over fwd+bwd (1.0 = at the limit); saved (T) = bytes saved for backward in
input-sized tensors; best f+b ms = the fastest round; faults/step = minor page faults of one fwd+bwd;
/contiguous = channels-last time over the same layer's time on the contiguous copy; /BN 95%, /cp 95% = a
bootstrap interval of the median of the per-round fwd+bwd ratios to torch's BatchNorm and to the counterpart
(every round times each layer once; an interval that holds 1.00 means this run cannot tell the two apart).
Medians of alternating rounds (ABBA) in one process. lnc, rmsc, dyt, derf run on the channel-last copy (N, *spatial, C). dyt and
derf (element-wise) have torch tanh as counterpart: torch.tanh forward+backward on the same tensor (goal:
/counterpart <= 1.5). NORM+ACT rows (bn+relu) are make_norm(NORM, C, act=ACT), their counterpart the row
"NORM then ACT": the same normlab norm followed by torch's activation (goal: /counterpart <= 0.8); "torch
BatchNorm2d then ACT" is torch's norm followed by it. goal = the issue's limit on /counterpart. "(A/A copy)":
an exact copy of torch's BatchNorm timed in the same rounds, the A/A control: its /native BN and /BN 95% are
the difference this run shows between two identical layers."""

LOADED_SPREAD = 0.3
"""A baseline whose interquartile range exceeds this fraction of its median was measured on a
loaded machine: the warning says so (ratios from the same run still compare like with like)."""


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="time each norm against torch's native layers and the memory limit")
    p.add_argument("--shape", default="32,64,56,56", help="input shape N,C,*spatial (default 32,64,56,56)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float64, bfloat16, float16; with "
                                                      "--model: float32 or bfloat16 (autocast)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (4-d/5-d shapes)")
    from .bench import DEFAULT_NORMS

    p.add_argument("--norms", default="", help=f"comma-separated specs; NORM+ACT (e.g. bn+relu, gn+silu) times a "
                                               f"fused norm + activation (default: {','.join(DEFAULT_NORMS)})")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--compile", action="store_true", help="time torch.compile(fullgraph=True) layers; reports compile time")
    p.add_argument("--repeats", type=int, default=20, help="alternating rounds per figure (default 20)")
    p.add_argument("--quick", action="store_true", help="3 rounds, 1 warm-up: a smoke test, not a measurement")
    p.add_argument("--malloc", choices=("default", "steady"), default="default",
                   help="steady: keep freed blocks in the process (glibc mallopt), so that page faults of fresh "
                        "buffers do not swamp the kernels' time; default: the allocator users run with")
    p.add_argument("--model", default=None, metavar="KIND",
                   help="time whole training steps of a small model instead: resnet, mlp, transformer or all; "
                        "torch's norms vs normlab.convert(model, the same kind)")
    p.add_argument("--batch-size", default="8,32", help="with --model: comma-separated batch sizes (default 8,32)")
    p.add_argument("--small", action="store_true", help="per-call times on small inputs against torch's same layers")
    p.add_argument("--no-progress", action="store_true", help="do not report progress on stderr")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the figures as JSON")
    p.set_defaults(func=_run, parser=p)
    return p


def _ints(text: str, what: str, parser: argparse.ArgumentParser) -> tuple[int, ...]:
    try:
        values = tuple(int(s) for s in text.split(","))
    except ValueError:
        parser.error(f"{what} must be comma-separated positive integers, got {text!r}")
    if not values or any(v <= 0 for v in values):
        parser.error(f"{what} must be comma-separated positive integers, got {text!r}")
    return values


def _validate(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed settings, or ``parser.error`` (exit code 2, one line) on a bad value."""
    import torch

    from .bench_models import MODELS
    from .bench import split_act
    from .functional.norm_act import ACTIVATIONS
    from .registry import parse_spec

    parser = args.parser
    if args.dtype not in DTYPES:
        parser.error(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    out: dict[str, Any] = {"dtype": getattr(torch, args.dtype)}
    if args.threads <= 0:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    if args.repeats <= 0:
        parser.error(f"--repeats must be a positive integer, got {args.repeats}")
    if args.model is not None:
        kinds = MODELS if args.model == "all" else tuple(k.strip() for k in args.model.split(","))
        bad = [k for k in kinds if k not in MODELS]
        if bad:
            parser.error(f"unknown --model {', '.join(bad)!s}; known: {', '.join(MODELS)} or all")
        if args.dtype not in ("float32", "bfloat16"):
            parser.error(f"--model runs float32 or bfloat16 (autocast), got --dtype {args.dtype}")
        out["kinds"] = kinds
        out["batch_sizes"] = _ints(args.batch_size, "--batch-size", parser)
        return out
    shape = _ints(args.shape, "--shape", parser)
    if len(shape) < 2:
        parser.error(f"--shape needs a batch and a channel axis (N,C,...), got {args.shape!r}")
    if args.channels_last and len(shape) not in (4, 5):
        parser.error(f"--channels-last needs a 4-d or 5-d --shape, got {args.shape!r}")
    norms = [n for n in args.norms.split(",") if n.strip()] if args.norms else None
    for spec in norms or ():
        try:
            base, act = split_act(spec)
            if act is None and "+" in base and not base.lower().endswith("+ws"):
                raise ValueError(f"--norms {spec!r}: unknown activation {base.rpartition('+')[2]!r} after '+'; "
                                 f"known: {', '.join(ACTIVATIONS)}")
            parse_spec(base)
        except ValueError as err:
            parser.error(str(err))
    out.update(shape=shape, norms=norms)
    return out


def loaded_warning(spreads: dict[str, float]) -> str | None:
    """A one-line warning if any baseline moved by more than :data:`LOADED_SPREAD` between rounds."""
    loud = {k: v for k, v in spreads.items() if v > LOADED_SPREAD}
    if not loud:
        return None
    what = ", ".join(f"{k} {v:.0%}" for k, v in loud.items())
    return (f"warning: the machine was loaded (interquartile spread over the median: {what}; above "
            f"{LOADED_SPREAD:.0%}): absolute times are unreliable, compare the ratios of this run only")


def faults_warning(rows: list[dict[str, Any]], allocator: str) -> str | None:
    """A one-line note naming the layers whose forward+backward took page faults (fresh memory
    from the system): their times, and every ratio to them, include the allocator's cost, which
    glibc's heuristics hand to whichever step next grows the heap (the baseline's too)."""
    hit = [f"{r['name']} {r['page_faults_per_step']:.0f}" for r in rows if r.get("page_faults_per_step", 0) >= 1]
    if not hit or allocator.startswith("steady"):
        return None
    return (f"note: page faults a step in {', '.join(hit)}: those times include fresh pages from the system "
            f"(glibc hands freed memory back by heuristics, and whichever step next grows the heap pays); "
            f"--malloc steady keeps it and times the layers alone")


def slower_line(rows: list[dict[str, Any]]) -> str:
    """The run's verdict in one line: the normlab layers it shows slower than torch (the 95%
    interval of the per-round ratio wholly above 1.00, against torch's own layer where torch has
    one, else torch's BatchNorm of the same dtype and layout), and those over their goal (the
    fused and element-wise rows, against their own baselines); "cannot tell" rows are neither."""
    slower, over = [], []
    for r in rows:
        if r["native"] or " then " in r["name"] or r["name"].endswith("(contiguous)"):
            continue
        own = r.get("ratio_to_counterpart") is not None
        ratio = r["ratio_to_counterpart"] if own else r["ratio_to_native_bn"]
        bounds = r.get("ratio_to_counterpart_interval" if own else "ratio_to_native_bn_interval")
        limit = r.get("goal") or 1.0
        if not bounds or round(bounds[0], 2) <= limit:  # (as printed: a low end of 1.004 reads 1.00)
            continue
        # (a goal row's baseline is named as the table names it: "tanh", "bn then relu")
        ref = "torch's BatchNorm" if not own else r["counterpart"] if r.get("goal") else f"torch {r['counterpart']}"
        (over if r.get("goal") else slower).append(f"{r['name']} {ratio:.2f} ({_interval(bounds)}) of {ref}")
    if not slower and not over:
        return "verdict: no layer is slower than torch's in this run (no 95% interval wholly above 1.00 or its goal)"
    parts = [f"slower than torch's in this run (the 95% interval above 1.00): {', '.join(slower)}"] if slower else []
    parts += [f"over their goal: {', '.join(over)}"] if over else []
    return "verdict: " + "; ".join(parts)


def _run(args: argparse.Namespace) -> int:
    from .bench import DEFAULT_NORMS, run_bench
    from .bench_models import format_models, format_small, run_models, run_small

    cfg = _validate(args)
    progress = not args.no_progress
    repeats = 3 if args.quick else args.repeats
    if args.model is not None:
        result = run_models(cfg["kinds"], cfg["batch_sizes"], cfg["dtype"], steps=repeats,
                            warmup=1 if args.quick else 3, threads=args.threads, progress=progress,
                            malloc=args.malloc)
        print(format_models(result))
        spreads = {f"torch {r['model']} b{r['batch_size']}": r["torch_spread"] for r in result["rows"]}
    elif args.small:
        result = run_small(cfg["dtype"], rounds=repeats, threads=args.threads, progress=progress)
        print(format_small(result))
        spreads = {f"torch {r['torch_layer']} {tuple(r['shape'])}": r["torch_spread"] for r in result["rows"]}
    else:
        result = run_bench(cfg["shape"], cfg["dtype"], args.channels_last, cfg["norms"] or list(DEFAULT_NORMS),
                           args.threads, args.compile, repeats, warmup=1 if args.quick else 3, malloc=args.malloc,
                           progress=progress)
        print(format_table(result))
        result["verdict"] = slower_line(result["rows"])
        print(result["verdict"])
        print(LEGEND)
        spreads = {"copy": result["copy_spread"], "torch BatchNorm": result["baseline_spread"]}
        note = faults_warning(result["rows"], result["allocator"])
        if note:
            print(note)
            result["faults_note"] = note
    warning = loaded_warning(spreads) if not args.quick else None
    if warning:
        print(warning)
        result["warning"] = warning
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def _interval(bounds: Any) -> str:
    return "-" if not bounds else f"{bounds[0]:.2f}-{bounds[1]:.2f}"


def format_table(result: dict[str, Any]) -> str:
    """The result of :func:`normlab.bench.run_bench` as a plain-text table."""
    from .bench_measure import host_line

    head = (f"{host_line(result)}, shape {tuple(result['shape'])} "
            f"{result['dtype']} {result['layout']}{' (compiled)' if result['compile'] else ''}; "
            f"copy {result['copy_ms']:.2f} ms ({result['copy_GBps']:.0f} GB/s), "
            f"8T limit {result['memory_limit_ms']:.2f} ms; medians of {result['repeats']} rounds; "
            f"allocator {result.get('allocator', 'default')}; {result.get('kernels', '')}")
    cols = ("layer", "fwd ms", "fwd+bwd ms", "eval ms", "/native BN", "/BN 95%", "/counterpart", "/cp 95%",
            "limit frac", "saved (T)", "best f+b ms", "faults/step")
    if any(r.get("ratio_to_contiguous") is not None for r in result["rows"]):
        cols += ("/contiguous",)
    if any(r.get("goal") is not None for r in result["rows"]):
        cols += ("goal",)
    w = max([16] + [len(r["name"]) + 6 * r["native"] for r in result["rows"]])  # "torch " + name
    lines = [head, "  ".join(f"{c:>12}" if i else f"{c:<{w}}" for i, c in enumerate(cols))]
    for r in result["rows"]:
        name = ("torch " if r["native"] else "") + r["name"]
        cp = f"{r['ratio_to_counterpart']:.2f}" if r.get("ratio_to_counterpart") is not None else "-"
        cells = (f"{r['train_fwd_ms']:.2f}", f"{r['train_fwd_bwd_ms']:.2f}", f"{r['eval_fwd_ms']:.2f}",
                 f"{r['ratio_to_native_bn']:.2f}", _interval(r.get("ratio_to_native_bn_interval")), cp,
                 _interval(r.get("ratio_to_counterpart_interval")), f"{r['memory_limit_fraction']:.2f}",
                 f"{r['saved_T']:.2f}",
                 f"{r.get('train_fwd_bwd_best_ms', math.nan):.2f}", f"{r.get('page_faults_per_step', math.nan):.0f}")
        if "/contiguous" in cols:
            rc = r.get("ratio_to_contiguous")
            cells += (f"{rc:.2f}" if rc is not None else "-",)
        if "goal" in cols:
            cells += (f"<= {r['goal']:.1f}" if r.get("goal") is not None else "-",)
        lines.append(f"{name:<{w}}  " + "  ".join(f"{c:>12}" for c in cells))
        if r.get("compile_s") is not None:
            lines[-1] += f"  (compile {r['compile_s']:.1f} s)"
    for spec, why in result.get("skipped", {}).items():
        lines.append(f"skipped {spec}: {why}")
    aa = result.get("aa")
    if aa:
        lines.append(f"A/A control: torch's BatchNorm over an exact copy of itself {aa['ratio']:.2f} "
                     f"(95% {_interval(aa['interval'])}): a ratio to it inside that band is one this run "
                     f"cannot tell from 1.00")
    return "\n".join(lines)
