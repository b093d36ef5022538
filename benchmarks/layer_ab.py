"""A/B timing of whole layers, forward+backward: this checkout's kernels against another cached build.

    PYTHONPATH=src python3 benchmarks/layer_ab.py --other normlab_kernels_<key>.so \\
        --norms frn,bn+relu,evob0 [--dtype bfloat16] [--channels-last] [--shape 32,64,56,56] \\
        [--threads 2] [--rounds 21]

Each layer (``make_norm(spec, C)``; ``NORM+ACT`` is ``make_norm(NORM, C, act=ACT)``, its
parameters moved off their initial values) takes a training step on the same input with both
kernel libraries, alternating (the order flipped every round), each timed step after one
untimed one. Printed: the median step of each library and the median, first and third quartile
of the per-round ratios this / other (a change to the kernels measured where users meet it, in
one process; ``pass_ab.py`` times the passes alone). The other library is a build in the kernel
cache folder, as for ``pass_ab.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from act_ab import other_library


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="file name of another cached kernel library")
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
    libs = {"this": _kernels._lib(), "other": other_library(args.other)}
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


if __name__ == "__main__":
    main()
