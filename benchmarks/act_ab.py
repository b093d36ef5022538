"""One-thread A/B timing of norm + activation forward+backward, for a machine shared with others.

    PYTHONPATH=src python3 benchmarks/act_ab.py --pairs bn+gelu,gn+silu --dtype bfloat16 \\
        [--other normlab_kernels_<key>.so] [--rounds 7]

For each NORM+ACT pair it times, in one process and one thread, alternating round by round:
the fused layer (``make_norm(NORM, C, act=ACT)``) on this checkout's kernels, the same on the
``--other`` kernel library (a cached build in the kernel cache folder, e.g. another branch's:
``_build.library_name`` names it; loaded through the same checks as the package's own), and
the counterpart: the normlab norm followed by torch's activation. The time of a round is the
CPU time of this thread (``time.thread_time``: what other processes do costs it little), the
figure the minimum over rounds. Shape (32, 64, 56, 56) by default, as ``normlab bench``.
"""

from __future__ import annotations

import argparse
import re
import time

import torch


def other_library(name: str):
    """Another kernel library from the kernel cache folder (e.g. another branch's build:
    ``_build.library_name`` names it), loaded through the same checks as the package's own."""
    from normlab import _kernels
    from normlab._kernels import _build

    if not re.fullmatch(r"normlab_kernels_[0-9a-f]{16}\.so", name):
        raise SystemExit(f"--other: expected a cached library's file name (normlab_kernels_<16 hex>.so), got {name!r}")
    path = _build.cache_dir()[0] / name  # the checked private cache folder
    return _build._load(_build._read_checked(path), path, _kernels._declare)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", default="bn+gelu,gn+gelu,rms+gelu,bn+silu,ln+silu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--other", default="", help="file name of another cached kernel library")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shape", default="32,64,56,56")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import normlab
    from normlab import _kernels
    from normlab.layers.norm_act import Activation

    assert _kernels.available(), _kernels.status()
    libs = {"this": _kernels._lib()}
    if args.other:
        libs["other"] = other_library(args.other)
    dtype = getattr(torch, args.dtype)
    shape = tuple(int(s) for s in args.shape.split(","))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)

    def step(m: torch.nn.Module, lib) -> float:
        _kernels._state["lib"] = lib
        xx = x.detach().requires_grad_()
        t0 = time.thread_time()
        m(xx).backward(dy)
        return time.thread_time() - t0

    for pair in args.pairs.split(","):
        norm, act = pair.split("+")
        c = shape[1]
        cases = {f"{pair} {name}": (normlab.make_norm(norm, c, act=act), lib) for name, lib in libs.items()}
        cases[f"{norm} then {act}"] = (torch.nn.Sequential(normlab.make_norm(norm, c), Activation(act)), libs["this"])
        best = {k: float("inf") for k in cases}
        for k, (m, lib) in cases.items():  # warm up (routes, allocator)
            step(m, lib)
        for _ in range(args.rounds):
            for k, (m, lib) in cases.items():
                best[k] = min(best[k], step(m, lib))
        base = best[f"{norm} then {act}"]
        print(" | ".join(f"{k} {v * 1e3:.1f} ms ({v / base:.3f})" for k, v in best.items()), flush=True)
    _kernels._state["lib"] = libs["this"]


if __name__ == "__main__":
    main()
