"""A/B timing of whole layers, forward+backward: this checkout's kernels against another cached
build, or this checkout's Python code against an earlier commit's.

    PYTHONPATH=src python3 benchmarks/layer_ab.py --other normlab_kernels_<key>.so \\
        --norms frn,bn+relu,evob0 [--dtype bfloat16] [--channels-last] [--shape 32,64,56,56] \\
        [--threads 2] [--rounds 21]
    PYTHONPATH=src python3 benchmarks/layer_ab.py --python-rev HEAD \\
        --modules normlab.engine.describe,normlab.functional.mixed --norms sn,bin

Each layer (``make_norm(spec, C)``; ``NORM+ACT`` is ``make_norm(NORM, C, act=ACT)``, its
parameters moved off their initial values) takes a training step on the same input with both
kernel libraries, alternating (the order flipped every round), each timed step after one
untimed one. Printed: the median step of each library and the median, first and third quartile
of the per-round ratios this / other (a change to the kernels measured where users meet it, in
one process; ``pass_ab.py`` times the passes alone). The other library is a build in the kernel
cache folder, as for ``pass_ab.py``.

With ``--python-rev``, "other" is the same kernels with the functions of ``--modules`` as at that
commit: each module's source at the commit is loaded beside it (``git show``), and for the other
side's rounds its module-level functions and its classes' methods replace this checkout's of the
same name (the classes themselves stay, so ``isinstance`` and imported names keep working; a
function imported by name into a third module is not swapped: list that module too).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import statistics
import subprocess
import time
from pathlib import Path

import torch

from act_ab import other_library


def _is_function(value) -> bool:
    return (callable(value) and hasattr(value, "__code__")) or isinstance(value, (staticmethod, classmethod, property))


def python_swaps(rev: str, modules: list[str]) -> tuple[list, list]:
    """``(this, other)``: lists of ``(owner, name, value)`` that put this checkout's or ``rev``'s
    functions of ``modules`` in place (see the module's docstring)."""
    root = Path(__file__).resolve().parent.parent
    this, other = [], []
    for name in modules:
        new = importlib.import_module(name)
        rel = Path(new.__file__).resolve().relative_to(root).as_posix()
        try:
            source = subprocess.run(["git", "show", f"{rev}:{rel}"], cwd=root, check=True, capture_output=True,
                                    text=True).stdout
        except subprocess.CalledProcessError as e:
            raise SystemExit(f"--python-rev: git show {rev}:{rel} failed: {e.stderr.strip()}") from None
        package, _, leaf = name.rpartition(".")
        spec = importlib.util.spec_from_loader(f"{package}._ab_{leaf}", loader=None)
        old = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        old.__package__, old.__file__ = package, new.__file__
        exec(compile(source, f"{rev}:{rel}", "exec"), old.__dict__)
        for key, value in list(vars(new).items()):
            mine = getattr(value, "__module__", None) == name
            if mine and isinstance(value, type) and isinstance(getattr(old, key, None), type):
                for attr, v_old in vars(getattr(old, key)).items():
                    if _is_function(v_old) and attr in vars(value):
                        this.append((value, attr, vars(value)[attr]))
                        other.append((value, attr, v_old))
            elif mine and _is_function(value) and _is_function(getattr(old, key, None)):
                this.append((new, key, value))
                other.append((new, key, getattr(old, key)))
    return this, other


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", default="", help="file name of another cached kernel library")
    ap.add_argument("--python-rev", default="", help="a commit whose --modules' functions are the other side")
    ap.add_argument("--modules", default="normlab.engine.describe",
                    help="comma-separated modules swapped with --python-rev")
    ap.add_argument("--norms", required=True, help="comma-separated specs, NORM+ACT for a fused activation")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--shape", default="32,64,56,56")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=21)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import normlab
    from normlab import _kernels

    assert _kernels.available(), _kernels.status()
    if bool(args.other) == bool(args.python_rev):
        raise SystemExit("give one of --other (a kernel build) and --python-rev (a commit)")
    if args.other:
        libs = {"this": _kernels._lib(), "other": other_library(args.other)}
        swaps: dict = {"this": [], "other": []}
    else:
        libs = {"this": _kernels._lib(), "other": _kernels._lib()}
        swaps = dict(zip(("this", "other"), python_swaps(args.python_rev, args.modules.split(","))))
    g = torch.Generator().manual_seed(0)
    shape = tuple(int(s) for s in args.shape.split(","))
    x = torch.randn(shape, generator=g).to(getattr(torch, args.dtype))
    dy = torch.randn(shape, generator=g).to(x.dtype)
    if args.channels_last:
        x, dy = (t.contiguous(memory_format=torch.channels_last) for t in (x, dy))
    x.requires_grad_()
    try:
        for spec in args.norms.split(","):
            name, _, act = spec.partition("+")
            layer = normlab.make_norm(name, shape[1], act=act) if act else normlab.make_norm(spec, shape[1])
            with torch.no_grad():
                for p in layer.parameters():
                    p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))

            def step():
                x.grad = None
                layer.zero_grad(set_to_none=True)
                layer(x).backward(dy)

            times: dict = {k: [] for k in libs}
            for r in range(args.rounds):
                for k in (("this", "other") if r % 2 else ("other", "this")):
                    _kernels._state["lib"] = libs[k]
                    for owner, attr, value in swaps[k]:
                        setattr(owner, attr, value)
                    step()
                    t0 = time.perf_counter()
                    step()
                    times[k].append(time.perf_counter() - t0)
            ratios = sorted(a / b for a, b in zip(times["this"], times["other"]))
            q = len(ratios) // 4
            this, other = (statistics.median(times[k]) * 1e3 for k in ("this", "other"))
            print(f"{spec:12s} {args.dtype} {'cl' if args.channels_last else 'cf'}: this {this:.2f} ms, "
                  f"other {other:.2f} ms, this/other {statistics.median(ratios):.3f} "
                  f"(quartiles {ratios[q]:.3f}-{ratios[-1 - q]:.3f})", flush=True)
    finally:
        _kernels._state["lib"] = libs["this"]
        for owner, attr, value in swaps["this"]:
            setattr(owner, attr, value)


if __name__ == "__main__":
    main()
