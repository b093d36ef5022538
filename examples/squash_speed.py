"""Forward+backward of Dynamic Tanh and Dynamic erf (``dyt``, ``derf``) against ``torch.tanh``
forward+backward on the same input (issue 16's goal: at most 1.5x), in one process,
alternating (order reversed every round), medians.

    PYTHONPATH=src python3 examples/squash_speed.py [threads] [rounds]

Cases: a transformer activation (32, 256, 768) with the channel axis last and an image batch
(32, 64, 56, 56) channel-first, in float32 and bfloat16. The baseline is ``y = torch.tanh(x)``
then ``y.backward(dy)``; the norms are layers from ``make_norm`` (alpha, weight and bias
learned, so their gradients are computed too), on normlab's kernels and, for reference, on
torch operations (``fast_path(False)``). ``dy`` is random, of x's shape and type.
"""

from __future__ import annotations

import sys

import torch
from modern_speed import measure  # (this folder: alternating rounds, medians)

import normlab
from normlab.functional import fast_path


def step(fn, x, dy, plain=False):
    def run():
        xx = x.detach().requires_grad_()
        if plain:
            with fast_path(False):
                y = fn(xx)
        else:
            y = fn(xx)
        y.backward(dy)
    return run


def main() -> None:
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 20
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    print(f"{threads} threads, {rounds} rounds, medians; {normlab.functional.kernel_status()}")
    print(f"{'shape':>18} {'dtype':>9} {'tanh ms':>8} {'dyt':>13} {'derf':>13} {'dyt ops':>13} {'derf ops':>13}")
    for shape, cd in (((32, 256, 768), -1), ((32, 64, 56, 56), 1)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(shape, dtype=dtype)
            dy = torch.randn(shape, dtype=dtype)
            c = shape[cd]
            dyt = normlab.make_norm("dyt", c, channel_dim=cd, dtype=dtype)
            derf = normlab.make_norm("derf", c, channel_dim=cd, dtype=dtype)
            cases = {"tanh": step(torch.tanh, x, dy), "dyt": step(dyt, x, dy), "derf": step(derf, x, dy),
                     "dyt ops": step(dyt, x, dy, plain=True), "derf ops": step(derf, x, dy, plain=True)}
            m = measure(cases, rounds)
            cols = " ".join(f"{m[k] * 1e3:6.1f} {m[k] / m['tanh']:5.2f}x" for k in list(cases)[1:])
            print(f"{str(shape):>18} {str(dtype)[6:]:>9} {m['tanh'] * 1e3:8.1f} {cols}", flush=True)


if __name__ == "__main__":
    main()
