"""How much of the engine's batch-norm step is the kernels' and how much everything around them.

    PYTHONPATH=src python3 benchmarks/engine_floor.py [--dtype bfloat16] [--sizes 14,56] [--rounds 41]

Three training steps (forward and backward) on the same (32, 64, S, S) input, alternating round
by round (the order rotated): normlab's ``bn`` forced onto the engine; a "floor", an autograd
Function that makes the engine's same four kernel calls (moments, output pass, sums, input
gradient) with fixed per-(n, c) coefficients and nothing else (no statistics merge, no adjoint,
no running statistics, no checks: it computes nothing useful); and torch's BatchNorm2d. The
engine minus the floor is what the description's small math, the layer's Python and autograd
around the Function cost; no implementation that keeps these four passes (a compiled
description included) can go below the floor. Half-precision inputs only: large float32 and
float64 ones take the per-channel fused pair instead (``batch_forward``/``batch_backward``, from
``normlab.engine.function.BATCH_FUSED_MIN_BYTES`` on), whose floor this is not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from overhead import steady_engine


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--sizes", default="14,56", help="spatial sizes S of a (32, 64, S, S) input")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=41)
    args = ap.parse_args()

    import normlab
    from normlab.engine import fast_path

    _kernels = steady_engine(args.threads)
    dtype = getattr(torch, args.dtype)
    n, c = 32, 64
    ones = torch.ones(n, c, dtype=torch.float64)
    zeros = torch.zeros(n, c, dtype=torch.float64)

    class Floor(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            v = x.view(n, c, -1)
            mean, _ = _kernels.moments(v, "cf")
            out = torch.empty_like(x)
            _kernels.affine(v, out.view(n, c, -1), "cf", mean, ones, zeros)
            ctx.save_for_backward(x)
            ctx.mean = mean
            return out

        @staticmethod
        def backward(ctx, dy):
            (x,) = ctx.saved_tensors
            v, d = x.view(n, c, -1), dy.contiguous().view(n, c, -1)
            _kernels.reduce(d, v, "cf", ctx.mean)
            dx = torch.empty_like(x)
            _kernels.dx(d, v, dx.view(n, c, -1), "cf", ctx.mean, ones, zeros, zeros)
            return dx

    print(f"{'S':>3s} {'engine bn':>10s} {'floor':>8s} {'torch BN':>9s} {'engine - floor':>15s}  (ms a step)")
    for s in (int(v) for v in args.sizes.split(",")):
        x = torch.randn(n, c, s, s).to(dtype).requires_grad_()
        dy = torch.randn_like(x)
        engine, native = normlab.make_norm("bn", c).to(dtype), torch.nn.BatchNorm2d(c).to(dtype)
        steps = {"engine bn": lambda: engine(x), "floor": lambda: Floor.apply(x), "torch BN": lambda: native(x)}
        times: dict = {k: [] for k in steps}
        names = list(steps)
        with fast_path(True):
            for r in range(args.rounds + 3):
                for k in names[r % 3:] + names[:r % 3]:
                    x.grad = None
                    t0 = time.perf_counter()
                    steps[k]().backward(dy)
                    if r >= 3:  # (three warm-up rounds)
                        times[k].append(time.perf_counter() - t0)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        print(f"{s:3d} {med['engine bn']:10.3f} {med['floor']:8.3f} {med['torch BN']:9.3f} "
              f"{med['engine bn'] - med['floor']:15.3f}", flush=True)


if __name__ == "__main__":
    main()
