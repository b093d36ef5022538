"""Micro-benchmarks: normlab's layers against torch's native ones and the memory limit.

For each norm, in one process: the median time of a training forward, of a training
forward+backward and of an eval forward; the bytes saved for backward (counted through
``torch.autograd.graph.saved_tensors_hooks``, each storage once); and the same figures for
torch's native equivalent where one exists. Candidates are measured in alternating order
(ABBA: a round's order, then the next round the same reversed) so that drifts of a shared
machine hit all of them alike, rotated from pair to pair of rounds (``_round_order``); an exact
copy of torch's BatchNorm baseline, timed in the same rounds, is the A/A control.

The memory limit: a training step of a layer whose statistics do not fit in cache moves at
least 8 input-sized tensors (3 forward, 5 backward); ``out.copy_(x)`` moves 2, so the limit
is ``4 * t_copy`` and ``fraction = 4 * t_copy / t_fwd_bwd`` (1.0 = at the limit).

``lnc`` and ``rmsc`` normalize over the channel axis alone (transformer style); they are
timed on the channel-last version of the shape, ``(N, *spatial, C)`` with ``channel_dim=-1``,
against ``torch.nn.LayerNorm(C)`` / ``torch.nn.RMSNorm(C)``: ``--shape 64,768,256`` is the
``(64, 256, 768)`` sequence batch of the issue. ``dyt`` and ``derf`` (element-wise, no
statistics) run on that channel-last input too, against a ``torch.tanh`` forward+backward
on the same tensor (row ``torch tanh``; their goal: at most 1.5x).

``NORM+ACT`` (``bn+relu``; ACT one of relu, leaky_relu, silu, gelu) times the fused layer
``make_norm(NORM, C, act=ACT)`` against the same normlab norm followed by torch's activation
(row ``NORM then ACT``; the goal: at most 0.8x) and, where torch has the norm, against
torch's layer followed by the activation (row ``torch BatchNorm2d then ACT``).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn

from .bench_measure import host, minor_faults, paired_ratio_interval, saved_bytes, spread, time_ms, use_malloc

__all__ = ["BenchRow", "DEFAULT_NORMS", "paired_ratio_interval", "run_bench", "saved_bytes", "split_act"]

# evos0 with gn's 32 groups (timm's default), so the two group-statistics rows compare alike
DEFAULT_NORMS = ("bn", "ln", "in", "gn", "rms", "mobn", "brn", "bin", "sn", "on", "lnc", "rmsc",
                 "frn", "evob0", "evos0:32", "grn", "pn", "dyt", "derf", "bn+relu")
CHANNEL_LAST_SPECS = ("lnc", "rmsc", "dyt", "derf")
ELEMENTWISE_SPECS = ("dyt", "derf")  # timed against torch.tanh forward+backward
TANH = "tanh"  # the element-wise baseline's row name
GOALS = {"elementwise": 1.5, "fused": 0.8}  # the limits on /counterpart
AA_SUFFIX = "(A/A copy)"  # the row of the exact copy of torch's BatchNorm baseline (the A/A control)


def split_act(spec: str) -> tuple[str, str | None]:
    """``"bn+relu"`` -> ("bn", "relu"): a fused norm + activation row; else (spec, None)."""
    from .functional.norm_act import ACTIVATIONS

    base, plus, act = spec.strip().rpartition("+")
    if plus and act.lower() in ACTIVATIONS:
        return base, act.lower()
    return spec.strip(), None


class _Tanh(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(x)


def _layer(spec: str, c: int, **kw: Any) -> nn.Module:
    base, act = split_act(spec)
    from .registry import make_norm

    return make_norm(base, c, act=act, **kw) if act else make_norm(base, c, **kw)


@dataclass
class BenchRow:
    """Figures for one layer (times in ms, medians over the rounds; ``train_fwd_bwd_best_ms``
    is the fastest round: on a shared machine, and with glibc handing large blocks back to
    the OS between steps (an input-sized allocation then costs about one page fault per 4 kB,
    several ms here), the median of two equal steps can differ by 2x while the best does not)."""

    name: str
    native: bool
    train_fwd_ms: float
    train_fwd_bwd_ms: float
    eval_fwd_ms: float
    saved_bytes: int
    saved_T: float
    ratio_to_native_bn: float = math.nan
    train_fwd_bwd_best_ms: float = math.nan
    memory_limit_fraction: float = math.nan
    counterpart: str | None = None
    ratio_to_counterpart: float | None = None
    goal: float | None = None  # the limit on ratio_to_counterpart, where it sets one
    compile_s: float | None = None
    ratio_to_contiguous: float | None = None
    page_faults_per_step: float = math.nan
    # bootstrap intervals (95%) of the median of the per-round ratios to torch's BatchNorm and
    # to the counterpart (every round times each layer once): what this run can tell apart
    ratio_to_native_bn_interval: tuple[float, float] | None = None
    ratio_to_counterpart_interval: tuple[float, float] | None = None
    note: str = ""


@dataclass
class _Case:
    name: str
    module: nn.Module
    x: Tensor
    dy: Tensor
    native: bool
    counterpart: str | None = None
    times: dict[str, list[float]] = field(default_factory=lambda: {"fwd": [], "fb": [], "eval": []})
    faults: list[int] = field(default_factory=list)
    compile_s: float | None = None
    layout_of: str | None = None  # a contiguous twin of this channels-last case: its name
    goal: float | None = None


def _native_for(spec: str, c: int, ndim: int) -> tuple[str, nn.Module] | None:
    spatial = ndim - 2
    if spec == "bn":
        cls = {0: nn.BatchNorm1d, 1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}.get(spatial)
        return (cls.__name__, cls(c)) if cls else None
    if spec == "in" and 1 <= spatial <= 3:
        cls = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[spatial]
        return cls.__name__, cls(c, affine=True)
    if spec.startswith("gn"):
        g = int(spec.split(":")[1]) if ":" in spec else 32
        return f"GroupNorm({g})", nn.GroupNorm(g, c)
    if spec == "ln":
        return "GroupNorm(1)", nn.GroupNorm(1, c)
    if spec == "lnc":
        return "LayerNorm", nn.LayerNorm(c)
    if spec == "rmsc" and hasattr(nn, "RMSNorm"):
        return "RMSNorm", nn.RMSNorm(c)
    return None


def _goal_cases(case: _Case, base: str, act: str | None, nat: tuple[str, nn.Module] | None, norm: nn.Module,
                dtype: torch.dtype, have: set[str]) -> list[_Case]:
    """The rows a fused (``act``) or element-wise row is measured against, not yet in ``have``;
    sets the row's counterpart and goal to them."""
    from .layers.norm_act import Activation

    def like(name: str, module: nn.Module, native: bool, counterpart: str | None = None) -> _Case:
        return _Case(name, module.to(dtype), case.x.detach().clone().requires_grad_(), case.dy, native, counterpart)

    if act is None:  # element-wise: torch.tanh on the same tensor
        case.counterpart, case.goal = TANH, GOALS["elementwise"]
        return [] if TANH in have else [like(TANH, _Tanh(), True)]
    case.counterpart, case.goal = f"{base} then {act}", GOALS["fused"]
    torch_pair = f"{nat[0]} then {act}" if nat else None
    out = [like(case.counterpart, nn.Sequential(norm, Activation(act)), False, torch_pair)]
    if nat and torch_pair not in have:
        out.append(like(torch_pair, nn.Sequential(nat[1], Activation(act)), True))
    return [k for k in out if k.name not in have]


def _grad_like(x: Tensor, gen: torch.Generator) -> Tensor:
    """A random incoming gradient laid out as ``x`` (channels-last for a channels-last input, 4-d
    or 5-d), as a layer's gradient arrives in a network of that layout: one in another layout
    would time torch's slow mixed-layout backward instead of the layer's."""
    return torch.empty_like(x).copy_(torch.randn(x.shape, generator=gen))


def _step(case: _Case, kind: str) -> Callable[[], Any]:
    m, x, dy = case.module, case.x, case.dy

    def fwd() -> Any:
        m.train()
        return m(x)

    def fb() -> Any:
        m.train()
        x.grad = None
        m(x).backward(dy)

    def ev() -> Any:
        m.eval()
        with torch.no_grad():
            return m(x)

    return {"fwd": fwd, "fb": fb, "eval": ev}[kind]


def run_bench(
    shape: Sequence[int] = (32, 64, 56, 56),
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    norms: Sequence[str] = DEFAULT_NORMS,
    threads: int | None = 2,
    compile: bool = False,
    repeats: int = 20,
    warmup: int = 3,
    natives: bool = True,
    malloc: str = "default",
    progress: bool = False,
    control: bool = True,
) -> dict[str, Any]:
    """Time every norm in ``norms`` (registry specs) and torch's native equivalents.

    With ``channels_last``, every normlab layer is also timed on the contiguous copy of the
    input in the same rounds (``ratio_to_contiguous``). ``malloc="steady"`` calls
    :func:`steady_malloc` first (the default keeps the allocator users run with). ``control``:
    also time an exact copy of torch's BatchNorm baseline in the same rounds (row
    ``BatchNorm2d (A/A copy)``, and ``aa``: its ratio and interval), the difference the run shows
    between two identical layers, against which a ratio near 1.0 can be read.
    Returns a JSON-ready dict: the settings (torch version, threads, shape, dtype, layout,
    allocator, whether normlab's compiled kernels are in use), the copy figures and one row
    per layer (see :class:`BenchRow`).
    """
    from . import _kernels
    from .registry import make_norm

    allocator = use_malloc(malloc)

    if threads is not None:
        torch.set_num_threads(threads)
    shape = tuple(int(s) for s in shape)
    if len(shape) < 2:
        raise ValueError(f"bench: shape needs a batch and a channel axis, got {shape}")
    c = shape[1]
    gen = torch.Generator().manual_seed(0)
    x_cf = torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
    if channels_last:
        fmt = {4: torch.channels_last, 5: torch.channels_last_3d}.get(len(shape))
        if fmt is None:
            raise ValueError(f"bench: --channels-last needs a 4-d or 5-d shape, got {shape}")
        x_cf = x_cf.contiguous(memory_format=fmt)
    x_contig = x_cf.contiguous()
    x_cl = x_cf.movedim(1, -1).contiguous()  # (N, *spatial, C) for the channel-axis norms
    layout = "channels_last" if channels_last else "contiguous"

    cases: list[_Case] = []
    skipped: dict[str, str] = {}
    for spec in norms:
        base, act = split_act(spec)
        chan = base.split(":")[0] in CHANNEL_LAST_SPECS
        x = x_cl if chan else x_cf
        try:
            kw: dict[str, Any] = {"channel_dim": -1} if chan else {}
            mod = _layer(spec, c, **kw).to(dtype)
            with torch.no_grad():
                mod(x)  # e.g. instance norm on an input without positions: the layer says why
        except Exception as err:  # unknown spec, or one that cannot apply to this shape
            skipped[spec] = f"{type(err).__name__}: {err}"
            continue
        nat = _native_for(base, c, len(shape)) if natives else None
        xg = x.detach().clone().requires_grad_()
        dy = _grad_like(x, gen)
        if compile:
            mod = torch.compile(mod, fullgraph=True)
        case = _Case(spec, mod, xg, dy, False, nat[0] if nat else None)
        if compile:
            t0 = time.perf_counter()
            _step(case, "fb")()
            _step(case, "eval")()
            case.compile_s = time.perf_counter() - t0
        cases.append(case)
        if channels_last and not chan:  # the same layer on the contiguous layout, for the ratio
            twin = copy.deepcopy(case.module) if not compile else torch.compile(_layer(spec, c).to(dtype),
                                                                                fullgraph=True)
            cases.append(_Case(f"{spec} (contiguous)", twin, x_contig.detach().clone().requires_grad_(),
                               dy.contiguous(), False))
            case.layout_of = f"{spec} (contiguous)"
        if act or base.split(":")[0] in ELEMENTWISE_SPECS:
            cases += _goal_cases(case, base, act, nat, make_norm(base, c, **kw).to(dtype), dtype,
                                 {k.name for k in cases})
            nat = None  # a fused row's torch norm runs with the activation
        if nat and not any(k.name == nat[0] for k in cases):
            cases.append(_Case(nat[0], nat[1].to(dtype), x.detach().clone().requires_grad_(), dy, True))
    # the baseline: torch's own BatchNorm (not a fused row's "BatchNorm2d then relu")
    nat = _native_for("bn", c, len(shape)) if natives else None
    if nat and not any(k.name == nat[0] for k in cases):
        cases.append(_Case(nat[0], nat[1].to(dtype), x_cf.detach().clone().requires_grad_(),
                           _grad_like(x_cf, gen), True))
    bn_case = next((k for k in cases if nat and k.native and k.name == nat[0]), None)
    if control and bn_case is not None:  # the A/A control: torch's layer against an exact copy of itself
        cases.append(_Case(f"{bn_case.name} {AA_SUFFIX}", copy.deepcopy(bn_case.module),
                           bn_case.x.detach().clone().requires_grad_(), bn_case.dy, True))

    # copy bandwidth on the same tensor size and layout
    out = torch.empty_like(x_cf)
    copy_f = lambda: out.copy_(x_cf)  # noqa: E731
    copy_times: list[float] = []
    for case in cases:
        for kind in ("fwd", "fb", "eval"):
            for _ in range(warmup):
                _step(case, kind)()
    for _ in range(warmup):
        copy_f()
    for r in range(repeats):
        if progress:
            import sys

            print(f"\rbench: round {r + 1}/{repeats}", end="" if r + 1 < repeats else "\n", file=sys.stderr, flush=True)
        order = _round_order(cases, r)
        copy_times.append(time_ms(copy_f))
        for case in order:
            for kind in ("fwd", "fb", "eval"):
                f0 = minor_faults() if kind == "fb" else 0
                case.times[kind].append(time_ms(_step(case, kind)))
                if kind == "fb":
                    case.faults.append(minor_faults() - f0)

    nbytes = x_cf.numel() * x_cf.element_size()
    t_copy = statistics.median(copy_times)
    limit_ms = 4 * t_copy
    rows: list[BenchRow] = []
    for case in cases:
        sb = saved_bytes(lambda: (case.module.train(), case.module(case.x))[1])
        med = {k: statistics.median(v) for k, v in case.times.items()}
        rows.append(BenchRow(case.name, case.native, med["fwd"], med["fb"], med["eval"], sb, sb / nbytes,
                             train_fwd_bwd_best_ms=min(case.times["fb"]), counterpart=case.counterpart, goal=case.goal,
                             compile_s=case.compile_s, page_faults_per_step=statistics.median(case.faults)))
    by_name = {r.name: r for r in rows}
    case_of = {k.name: k for k in cases}
    bn_native = by_name[bn_case.name] if bn_case is not None else None
    for r in rows:
        fb = case_of[r.name].times["fb"]
        if bn_native is not None:
            r.ratio_to_native_bn = r.train_fwd_bwd_ms / bn_native.train_fwd_bwd_ms
            if r is not bn_native:
                r.ratio_to_native_bn_interval = paired_ratio_interval(fb, bn_case.times["fb"])  # type: ignore[union-attr]
        r.memory_limit_fraction = limit_ms / r.train_fwd_bwd_ms
        if r.counterpart and r.counterpart in by_name:
            r.ratio_to_counterpart = r.train_fwd_bwd_ms / by_name[r.counterpart].train_fwd_bwd_ms
            r.ratio_to_counterpart_interval = paired_ratio_interval(fb, case_of[r.counterpart].times["fb"])
    for case in cases:
        if case.layout_of in by_name:
            by_name[case.name].ratio_to_contiguous = (by_name[case.name].train_fwd_bwd_ms
                                                      / by_name[case.layout_of].train_fwd_bwd_ms)
    return {
        **host(),
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "layout": layout,
        "compile": compile,
        "repeats": repeats,
        "allocator": allocator,
        "kernels": _kernels.status(),
        "T_bytes": nbytes,
        "copy_ms": t_copy,
        "copy_GBps": 2 * nbytes / (t_copy * 1e-3) / 1e9,
        "memory_limit_ms": limit_ms,
        "copy_spread": spread(copy_times),
        "baseline_spread": spread(bn_case.times["fb"]) if bn_case is not None else 0.0,
        "aa": _control_of(rows, bn_case),
        "rows": [asdict(r) for r in rows],
        "skipped": skipped,
    }


def _round_order(cases: list, r: int) -> list:
    """The cases in round ``r``: rounds in pairs, the second the first reversed (ABBA, so that a
    drift of the machine within a pair hits every case alike), each pair's list rotated by 7 more
    places, so that the case timed right after the copy (which leaves the caches full of its dirty
    lines for the next step to write back) changes from pair to pair instead of always being the
    last one."""
    s = (r // 2 * 7) % max(len(cases), 1)
    order = cases[s:] + cases[:s]
    return order if r % 2 == 0 else order[::-1]


def _control_of(rows: list[BenchRow], bn_case: _Case | None) -> dict[str, Any] | None:
    """The A/A control's ratio to the baseline and its interval (None without one)."""
    row = next((r for r in rows if bn_case is not None and r.name == f"{bn_case.name} {AA_SUFFIX}"), None)
    if row is None:
        return None
    return {"ratio": row.ratio_to_native_bn, "interval": row.ratio_to_native_bn_interval}
