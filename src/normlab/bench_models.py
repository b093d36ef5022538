"""Benchmarks the way users run the layers: whole training steps of small models, and
per-call times on small inputs, each against torch's own norms in the same process.

``run_models``: a full training step (forward, loss, backward, optimizer step) of a small
ResNet-style CNN (``resnet``: BatchNorm2d), an MLP with BatchNorm1d (``mlp``) or a pre-norm
Transformer encoder (``transformer``: LayerNorm over the channels), with torch's norms and
after ``normlab.convert(model, <the same kind>)`` (``bn``, ``bn``, ``lnc``), from the same
initial weights, alternating the models step by step (with an exact copy of torch's model as a
control); optionally under ``torch.autocast("cpu", dtype=torch.bfloat16)``. Each model's page
faults a step are counted: glibc's allocator returns freed memory to the system by heuristics,
and whichever model's step then touches fresh pages pays for it (``malloc="steady"`` keeps
freed memory in the process, as :func:`normlab.bench_measure.steady_malloc` says).

``run_small``: per-call training forward and forward+backward of normlab's layer and torch's
same layer on small inputs, where the Python around the kernels is the cost: (8, 16, 8, 8),
(64, 512) and (8, 128, 256) (``lnc``/``rmsc`` with ``channel_dim=-1``).
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .bench_measure import host, host_line, minor_faults, paired_ratio_interval, spread, use_malloc

__all__ = ["MODELS", "SMALL_CASES", "build_model", "run_models", "run_small"]

MODELS = ("resnet", "mlp", "transformer")
_SPEC = {"resnet": "bn", "mlp": "bn", "transformer": "lnc"}


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                      if stride != 1 or cin != cout else nn.Identity())

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


def _resnet() -> nn.Module:
    """A ResNet-style CNN for 32x32 RGB images: stem, three stages (32, 64, 128 channels)."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
                         _Block(32, 32, 1), _Block(32, 64, 2), _Block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def _mlp() -> nn.Module:
    layers: list[nn.Module] = []
    width = 256
    for _ in range(3):
        layers += [nn.Linear(width, 512), nn.BatchNorm1d(512), nn.ReLU()]
        width = 512
    return nn.Sequential(*layers, nn.Linear(512, 10))


class _Encoder(nn.Module):
    """A pre-norm Transformer encoder (2 layers, width 256, 4 heads) over 64 tokens, then a
    mean-pooled classifier."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(256, 4, 512, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(x)).mean(1))


def build_model(kind: str, batch_size: int, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    """(model with torch's norms, input batch, labels) for ``kind`` in :data:`MODELS`."""
    if kind not in MODELS:
        raise ValueError(f"unknown model {kind!r}; known: {', '.join(MODELS)}")
    torch.manual_seed(seed)
    model = {"resnet": _resnet, "mlp": _mlp, "transformer": _Encoder}[kind]()
    shape = {"resnet": (batch_size, 3, 32, 32), "mlp": (batch_size, 256), "transformer": (batch_size, 64, 256)}[kind]
    return model, torch.randn(shape), torch.randint(0, 10, (batch_size,))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor,
                dtype: torch.dtype) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if dtype == torch.float32:
            loss = F.cross_entropy(model(x), y)
        else:
            with torch.autocast("cpu", dtype=dtype):
                loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    return step


# the arms' orders in a round, in turn: each arm runs first, second and third equally often
_ORDERS = ((0, 1, 2), (2, 1, 0), (1, 2, 0), (0, 2, 1), (2, 0, 1), (1, 0, 2))


def run_models(kinds: tuple[str, ...] = MODELS, batch_sizes: tuple[int, ...] = (8, 32),
               dtype: torch.dtype = torch.float32, steps: int = 20, warmup: int = 3, threads: int | None = 2,
               progress: bool = True, malloc: str = "default") -> dict[str, Any]:
    """Median training-step time of each model with torch's norms and with normlab's, alternating.

    A third model, an exact copy of torch's (``copy.deepcopy``: the same layers, weights and
    optimizer, only other memory), runs in the same rounds as a control: its ratio to torch's
    (``aa_ratio``, with its paired interval) is what this run measures between two identical
    models, the noise floor to read normlab's ratio against. ``*_faults``: the median minor page
    faults of each model's step; ``malloc="steady"`` first raises glibc's trim and mmap
    thresholds (:func:`normlab.bench_measure.steady_malloc`), so that no step pays for fresh pages."""
    from .convert import convert

    allocator = use_malloc(malloc)
    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for kind in kinds:
        for bs in batch_sizes:
            base, x, y = build_model(kind, bs)
            ours = convert(copy.deepcopy(base), _SPEC[kind])
            twin = copy.deepcopy(base)
            steps_of = [_train_step(m, torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9), x, y, dtype)
                        for m in (base, ours, twin)]
            for f in steps_of:
                for _ in range(warmup):
                    f()
            times: list[list[float]] = [[], [], []]
            faults: list[list[int]] = [[], [], []]
            for r in range(steps):
                order = _ORDERS[r % len(_ORDERS)]
                for i in order:
                    f0 = minor_faults()
                    t0 = time.perf_counter()
                    steps_of[i]()
                    times[i].append((time.perf_counter() - t0) * 1e3)
                    faults[i].append(minor_faults() - f0)
                if progress:
                    print(f"\rbench: {kind} batch {bs}: step {r + 1}/{steps}", end="", file=sys.stderr, flush=True)
            torch_ms, ours_ms, twin_ms = (statistics.median(t) for t in times)
            low, high = paired_ratio_interval(times[1], times[0])
            aa_low, aa_high = paired_ratio_interval(times[2], times[0])
            rows.append({"model": kind, "batch_size": bs, "norm": _SPEC[kind], "torch_ms": torch_ms,
                         "normlab_ms": ours_ms, "ratio": ours_ms / torch_ms, "ratio_low": low, "ratio_high": high,
                         "copy_ms": twin_ms, "aa_ratio": twin_ms / torch_ms, "aa_low": aa_low, "aa_high": aa_high,
                         "torch_faults": statistics.median(faults[0]), "normlab_faults": statistics.median(faults[1]),
                         "copy_faults": statistics.median(faults[2]), "torch_spread": spread(times[0])})
    if progress:
        print(file=sys.stderr)
    return {**host(), "dtype": str(dtype).replace("torch.", ""),
            "steps": steps, "allocator": allocator, "rows": rows}


SMALL_CASES = (("bn", (8, 16, 8, 8), 1), ("gn:4", (8, 16, 8, 8), 1), ("ln", (8, 16, 8, 8), 1),
               ("in", (8, 16, 8, 8), 1), ("bn", (64, 512), 1), ("lnc", (64, 512), -1), ("bn", (8, 128, 256), 1),
               ("lnc", (8, 128, 256), -1), ("rmsc", (8, 128, 256), -1))


def run_small(dtype: torch.dtype = torch.float32, rounds: int = 15, threads: int | None = 1,
              progress: bool = True) -> dict[str, Any]:
    """Per-call microseconds (medians of ``rounds`` alternating blocks of calls) of normlab's layer
    and torch's same layer on :data:`SMALL_CASES`."""
    from .bench import _native_for
    from .registry import make_norm

    if threads is not None:
        torch.set_num_threads(threads)
    rows = []
    for k, (spec, shape, cd) in enumerate(SMALL_CASES):
        c = shape[cd]
        ours = make_norm(spec, c, **({"channel_dim": -1} if cd == -1 else {})).to(dtype)
        name, theirs = _native_for(spec, c, len(shape))  # type: ignore[misc]
        theirs = theirs.to(dtype)
        x = torch.randn(shape).to(dtype).requires_grad_()
        dy = torch.randn(shape).to(dtype)
        calls = [(lambda m=m: m(x), lambda m=m: m(x).backward(dy)) for m in (ours, theirs)]
        n = max(5, int(20000 // x.numel() ** 0.5))  # calls per block: blocks of a few ms
        times: list[list[float]] = [[], [], [], []]
        for pair in calls:
            for f in pair:
                for _ in range(5):
                    f()
        for r in range(rounds):
            for i, pair in enumerate(calls if r % 2 == 0 else calls[::-1]):
                j = i if r % 2 == 0 else 1 - i
                for kind, f in enumerate(pair):
                    t0 = time.perf_counter()
                    for _ in range(n):
                        f()
                    times[2 * j + kind].append((time.perf_counter() - t0) / n * 1e6)
        med = [statistics.median(t) for t in times]
        rows.append({"norm": spec, "shape": list(shape), "channel_dim": cd, "torch_layer": name,
                     "fwd_us": med[0], "torch_fwd_us": med[2], "fwd_ratio": med[0] / med[2],
                     "fwd_bwd_us": med[1], "torch_fwd_bwd_us": med[3], "fwd_bwd_ratio": med[1] / med[3],
                     "torch_spread": spread(times[3])})
        if progress:
            print(f"\rbench: small inputs {k + 1}/{len(SMALL_CASES)}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    return {**host(), "dtype": str(dtype).replace("torch.", ""),
            "rounds": rounds, "rows": rows}


def format_models(result: dict[str, Any]) -> str:
    lines = [f"{host_line(result)}, {result['dtype']}"
             f"{' autocast' if result['dtype'] != 'float32' else ''}; one training step (forward, loss, "
             f"backward, SGD step), medians of {result['steps']} alternating steps; allocator "
             f"{result.get('allocator', 'default')}",
             f"{'model':<12} {'batch':>5} {'norm':>5} {'torch ms':>10} {'normlab ms':>11} {'ratio':>6} "
             f"{'paired 95%':>12} {'A/A':>6} {'A/A 95%':>12} {'faults torch/normlab/copy':>26}"]
    for r in result["rows"]:
        fl = f"{r['torch_faults']:.0f}/{r['normlab_faults']:.0f}/{r['copy_faults']:.0f}"
        lines.append(f"{r['model']:<12} {r['batch_size']:>5} {r['norm']:>5} {r['torch_ms']:>10.2f} "
                     f"{r['normlab_ms']:>11.2f} {r['ratio']:>6.2f} {r['ratio_low']:>5.2f}-{r['ratio_high']:<5.2f} "
                     f"{r['aa_ratio']:>6.2f} {r['aa_low']:>5.2f}-{r['aa_high']:<5.2f} {fl:>26}")
    lines.append("ratio = normlab's median step over torch's; paired 95% = a bootstrap interval of the median of "
                 "the per-round ratios (the models' steps alternate, back to back): one that holds 1.00 "
                 "means this run cannot tell them apart; A/A = the same for an exact copy of torch's model "
                 "timed in the same rounds (the difference this run shows between identical models); faults = "
                 "median minor page faults of a step (fresh memory from the system: glibc's allocator hands "
                 "freed memory back by heuristics, and the step that next grows the heap pays; --malloc steady "
                 "keeps it)")
    return "\n".join(lines)


def format_small(result: dict[str, Any]) -> str:
    lines = [f"{host_line(result)}, {result['dtype']}; per call, microseconds, "
             f"medians of {result['rounds']} alternating blocks",
             f"{'norm':<6} {'shape':<16} {'torch layer':<16} {'fwd':>8} {'torch':>8} {'ratio':>6} "
             f"{'fwd+bwd':>9} {'torch':>9} {'ratio':>6}"]
    for r in result["rows"]:
        lines.append(f"{r['norm']:<6} {str(tuple(r['shape'])):<16} {r['torch_layer']:<16} {r['fwd_us']:>8.1f} "
                     f"{r['torch_fwd_us']:>8.1f} {r['fwd_ratio']:>6.2f} {r['fwd_bwd_us']:>9.1f} "
                     f"{r['torch_fwd_bwd_us']:>9.1f} {r['fwd_bwd_ratio']:>6.2f}")
    return "\n".join(lines)
