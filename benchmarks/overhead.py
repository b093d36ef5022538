"""The engine's time per training step outside its kernels, by input size.

    PYTHONPATH=src python3 benchmarks/overhead.py [--norms bn,sn,evob0] [--channels-last] \\
        [--dtype float32] [--sizes 2,7,14,28,56] [--rounds 21] [--bound]

A norm on the engine is, per forward+backward, four passes over the data in C (the kernel
calls) and, between them, small float64 math in torch: the description's merge and adjoint,
the running statistics, handing the coefficients over, autograd. For each norm (forced onto the
engine) and each spatial size (input (32, 64, S, S)) this times the whole step and the calls
into the kernel library within it (timed at the ctypes boundary), and prints the rest and the
number of torch operations a step makes; beside them, torch's BatchNorm2d's whole step on the
same input, timed in the same rounds (the order alternating), and the kernel calls' time over it:
a norm whose kernels alone take longer than torch's whole step cannot reach 1.0x it by any cut of
the rest. The allocator is kept steady (``normlab.bench``'s
``steady_malloc``), so that no page faults land in either share.

``--bound`` also times, in the same rounds, the step with the description's small math taken
out: each description method (``coefficients``, ``input_grad``, ``param_grads``) returns what its
first call returned and leaves the state that call left, so the step makes the kernel calls,
the layer's Python, the running statistics and autograd, and no merge or adjoint. That is the
best a description compiled as a whole (its math in one call) could do, with that call free
(EvoNorm's adjoint is inside its ``backward`` with the kernel calls, and stays).

The last lines time one fixed sequence of small torch operations with nothing before it and
right after a pass over an input-sized tensor: after a pass the same operations take longer
(the pass evicted their code and data from the caches), which is why the rest grows with the
input although the small math does not.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class _Timed:
    """A kernel library whose functions add their wall time to ``total`` (attributes such as
    ``argtypes`` go to the real function)."""

    def __init__(self, lib) -> None:
        object.__setattr__(self, "lib", lib)
        object.__setattr__(self, "total", 0.0)

    def __getattr__(self, name: str):
        return _TimedFn(self, getattr(self.lib, name))


class _TimedFn:
    def __init__(self, owner: _Timed, fn) -> None:
        object.__setattr__(self, "owner", owner)
        object.__setattr__(self, "fn", fn)

    def __getattr__(self, name: str):
        return getattr(self.fn, name)

    def __setattr__(self, name: str, value) -> None:
        setattr(self.fn, name, value)

    def __call__(self, *args):
        t0 = time.perf_counter()
        try:
            return self.fn(*args)
        finally:
            object.__setattr__(self.owner, "total", self.owner.total + time.perf_counter() - t0)


class _NoMath:
    """While on, every description's math methods replay their first call (see ``--bound``)."""

    METHODS = ("coefficients", "input_grad", "param_grads")

    def __init__(self) -> None:
        from normlab.engine.describe import Description

        classes, todo = [], [Description]
        while todo:
            c = todo.pop()
            classes.append(c)
            todo.extend(c.__subclasses__())
        self.real = {(c, m): c.__dict__[m] for c in classes for m in self.METHODS if m in c.__dict__}
        self.first: dict = {}

    def _replay(self, key):
        real = self.real[key]

        def replay(desc, *args):
            if key not in self.first:
                out = real(desc, *args)
                self.first[key] = (out, dict(desc.__dict__))
            out, state = self.first[key]
            desc.__dict__.update(state)
            return out

        return replay

    def __enter__(self):
        for (c, m) in self.real:
            setattr(c, m, self._replay((c, m)))
        return self

    def __exit__(self, *exc) -> None:
        for (c, m), f in self.real.items():
            setattr(c, m, f)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def _small_ops(a: torch.Tensor, b: torch.Tensor) -> None:
    """A fixed handful of the small float64 operations a description makes."""
    m = (a * b + a).rsqrt_().reshape(1, -1)
    (m.detach().to(torch.float32) * 2).sum()
    torch.cat([a, b]).mean()


def steady_engine(threads: int):
    """Set the threads, keep the allocator steady, and return ``normlab._kernels`` with its library
    loaded (else exit with the reason): the setup of the engine's timing scripts."""
    from normlab import _kernels
    from normlab.bench_measure import steady_malloc

    torch.set_num_threads(threads)
    steady_malloc()
    if _kernels._lib() is None:
        raise SystemExit(f"the kernels are not loaded: {_kernels._state['reason']}")
    return _kernels


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--norms", default="bn,sn,bin,evob0")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--sizes", default="2,7,14,28,56", help="spatial sizes S of a (32, 64, S, S) input")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=21)
    ap.add_argument("--bound", action="store_true",
                    help="also time the step without the descriptions' small math (a compiled description's best case)")
    args = ap.parse_args()

    import normlab
    from normlab.engine import fast_path

    _kernels = steady_engine(args.threads)
    timed = _Timed(_kernels._state["lib"])
    dtype = getattr(torch, args.dtype)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    print(f"{'norm':8s} {'S':>3s} {'step ms':>8s} {'kernels':>8s} {'rest':>7s} {'ops':>5s} {'torch BN':>9s} "
          f"{'kernels/BN':>10s}" + (f" {'no math':>8s} {'step/BN':>8s} {'no math/BN':>10s}" if args.bound else ""))
    try:
        _kernels._state["lib"] = timed
        for name in args.norms.split(","):
            for s in (int(v) for v in args.sizes.split(",")):
                layer = normlab.make_norm(name, 64).to(dtype)
                native = torch.nn.BatchNorm2d(64).to(dtype)
                x = torch.randn(32, 64, s, s).to(dtype).contiguous(memory_format=fmt).requires_grad_()
                dy = torch.randn_like(x)
                steps, kernels, natives, bounds = [], [], [], []

                def step_of(m) -> float:
                    x.grad = None
                    t0 = time.perf_counter()
                    m(x).backward(dy)
                    return time.perf_counter() - t0

                with fast_path(True):
                    for r in range(args.rounds + 2):
                        if r % 2:  # (torch's BatchNorm2d in the same rounds, the order alternating)
                            t_native = step_of(native)
                        object.__setattr__(timed, "total", 0.0)
                        t_step = step_of(layer)
                        t_kernels = timed.total
                        if not r % 2:
                            t_native = step_of(native)
                        if args.bound:
                            with _NoMath():  # (a fresh replay for each round: its first call made afresh)
                                step_of(layer)
                                t_bound = step_of(layer)
                        if r >= 2:  # (two warm-up rounds)
                            if args.bound:
                                bounds.append(t_bound)
                            steps.append(t_step)
                            kernels.append(t_kernels)
                            natives.append(t_native)
                    count = _Count()
                    with count:
                        layer(x).backward(dy)
                step, kern = statistics.median(steps) * 1e3, statistics.median(kernels) * 1e3
                bn = statistics.median(natives) * 1e3
                line = (f"{name:8s} {s:3d} {step:8.3f} {kern:8.3f} {step - kern:7.3f} {count.ops:5d} {bn:9.3f} "
                        f"{kern / bn:10.2f}")
                if args.bound:
                    nomath = statistics.median(bounds) * 1e3
                    line += f" {nomath:8.3f} {step / bn:8.2f} {nomath / bn:10.2f}"
                print(line, flush=True)
    finally:
        _kernels._state["lib"] = timed.lib

    a, b = torch.randn(64, dtype=torch.float64), torch.randn(64, dtype=torch.float64)
    big = torch.randn(32, 64, 56, 56).contiguous(memory_format=fmt)
    after = {"nothing": lambda: None, "a pass over (32, 64, 56, 56)": lambda: big.sum()}
    times: dict = {k: [] for k in after}
    for r in range(args.rounds * 3):
        for k, before in after.items():
            before()
            t0 = time.perf_counter()
            _small_ops(a, b)
            times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        print(f"the same small torch ops after {k}: {statistics.median(v) * 1e6:.0f} us")


if __name__ == "__main__":
    main()
