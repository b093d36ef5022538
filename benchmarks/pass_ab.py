"""A/B timing of the kernels' passes: this checkout's library against another cached build.

    PYTHONPATH=src python3 benchmarks/pass_ab.py --other normlab_kernels_<key>.so \\
        [--dtype bfloat16] [--layout cl] [--passes moments,affine,evob0_dx] [--threads 2] [--rounds 15] [--cold]

Each pass runs on the same (N, C, L) data with both libraries, alternating call by call in one
process (the order flipped every round), and the figure is the median wall time of a round of
two calls; with ``--cold``, of one call after a 64 MB write evicted the caches, as a pass inside
a layer's step finds them (without it the re-run finds part of its data in the last-level
cache). The last column says whether the two libraries' outputs agree bit for bit (sums may
differ in their last digits where a change reorders them). The other library is a build in the
kernel cache folder (``_build.library_name`` names a checkout's; build it by importing normlab
in that checkout once), loaded through the same checks as the package's own. Shape (32, 64,
3136) by default: ``normlab bench``'s (32, 64, 56, 56) as the kernels see it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from act_ab import other_library


def passes(x, dy, out, layout: str) -> dict:
    """The passes by name: the generic ones, the per-sample fused pair (group and layer norm),
    EvoNorm's (B0 and S0), on per-(n, c) coefficients, and Dynamic tanh's and erf's."""
    from normlab import _kernels
    from normlab._kernels import evonorm as ev

    n, c = (x.shape[0], x.shape[1]) if layout == "cf" else (x.shape[0], x.shape[2])
    g = torch.Generator().manual_seed(1)
    a, b, m, v = (torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(4))
    d = torch.rand(1, c, generator=g, dtype=torch.float64) + 0.5
    e = torch.rand(n, c, generator=g, dtype=torch.float64) + 0.5
    return {
        "moments": lambda: _kernels.moments(x, layout),
        "affine": lambda: _kernels.affine(x, out, layout, m, e, b),
        "reduce": lambda: _kernels.reduce(dy, x, layout, m),
        "dx": lambda: _kernels.dx(dy, x, out, layout, m, a, b, e),
        # the per-sample fused pair (group norm, 32 groups where C allows; ln_: one group), with
        # the per-(n, c) moments (as both libraries take them), and its backward
        **{f"{name}_{step}": _group(step, groups, x, dy, out, layout, d[0], b[0])
           for name, groups in (("gn", 32 if c % 32 == 0 else 1), ("ln", 1)) for step in ("fwd", "bwd")},
        # the sums and the input gradient with an activation's derivative (norm + act, FRN's TLU)
        **{f"{pas}_{name}": _act(pas, name, x, dy, out, layout, m, a, b, e) for name in ("relu", "silu", "tlu")
           for pas in ("reduce", "dx")},
        "evob0_fwd": lambda: ev.evonorm_forward("b0", x, out, layout, v[0], d, e, a, b),
        "evob0_red": lambda: ev.evonorm_reduce("b0", dy, x, layout, v[0], d, e),
        "evob0_dx": lambda: ev.evonorm_dx("b0", dy, x, out, layout, v[0], d, e, a, b, m, e),
        "evos0_fwd": lambda: ev.evonorm_forward("s0", x, out, layout, v[0], None, None, a, b),
        "evos0_red": lambda: ev.evonorm_reduce("s0", dy, x, layout, v[0], None, None, keep=out),
        "evos0_sample_fwd": lambda: ev.evos0_forward(x, out, layout, 32 if c % 32 == 0 else 1, 1e-5, v[0], None, None),
        # the transformer's layer and RMS norm over the channels of each position (channels-last)
        **({f"{name}_{step}": _rows(step, center, x, dy, out, d[0], b[0])
            for name, center in (("rowsln", True), ("rowsrms", False)) for step in ("fwd", "bwd")}
           if layout == "cl" else {}),
        # Dynamic tanh and erf (elementwise_impl.h): channels-last as (M, C) rows
        **{f"{name}_{step}": _squash(step, kind, x, dy, out, layout, d[0], b[0])
           for name, kind in (("dyt", "tanh"), ("derf", "erf")) for step in ("fwd", "bwd")},
    }


def _group(step: str, groups: int, x, dy, out, layout: str, w, bias):
    from normlab import _kernels

    if step == "fwd":
        return lambda: _kernels.group_forward(x, out, layout, groups, 1e-5, True, w, bias)
    ctr, rstd = _kernels.group_forward(x, torch.empty_like(x), layout, groups, 1e-5, True, w, bias)[2:]
    return lambda: _kernels.group_backward(dy, x, out, layout, groups, True, w, ctr, rstd, bias)[:2]


def _act(pas: str, name: str, x, dy, out, layout: str, m, a, b, e):
    """``reduce`` or ``dx`` with the activation ``name`` on ``(x - m) * e + b``; SiLU's sums keep
    ``dy'`` in ``out``, and its input gradient reads it back (as the layers run them)."""
    from normlab import _kernels

    c = x.shape[1] if layout == "cf" else x.shape[2]
    code = _kernels.EPILOGUES["leaky_relu" if name == "relu" else name]
    act = _kernels.Epilogue(code, 0.0, torch.linspace(-0.5, 0.5, c) if name == "tlu" else None)
    keep = name == "silu"
    if pas == "reduce":
        return lambda: _kernels.reduce(dy, x, layout, m, act, e, b, keep=out if keep else None)
    return lambda: _kernels.dx(dy, x, out, layout, m, a, b, e, act, e, b, kept=keep)


def _rows(step: str, center: bool, x, dy, out, w, bias):
    from normlab import _kernels

    xr, dr, orr = (t.reshape(-1, t.shape[-1]) for t in (x, dy, out))
    w, bias = w.float(), bias.float() if center else None
    if step == "fwd":
        return lambda: _kernels.rows_forward(xr, orr, 1e-5, w, bias, center)
    mean, rstd = _kernels.rows_forward(xr, torch.empty_like(xr), 1e-5, w, bias, center)
    return lambda: _kernels.rows_backward(dr, xr, orr, w, mean, rstd, True, center)


def _squash(step: str, kind: str, x, dy, out, layout: str, w, bias):
    from normlab._kernels import elementwise as ew

    def rows(t):
        return t.reshape(-1, t.shape[-1]) if layout == "cl" else t

    if step == "fwd":
        return lambda: ew.squash_forward(rows(x), rows(out), layout, kind, 0.7, 0.1, w, bias)
    return lambda: ew.squash_backward(rows(dy), rows(x), rows(out), layout, kind, 0.7, 0.1, w)[:2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--other", required=True, help="file name of another cached kernel library")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--layout", default="cf", choices=["cf", "cl"])
    ap.add_argument("--passes", default="all")
    ap.add_argument("--shape", default="32,64,3136", help="N,C,L")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--cold", action="store_true",
                    help="evict the caches (write 64 MB) before each timed call, as a pass in a layer's step finds "
                         "them; default: the pass re-runs on the same data, which the last-level cache partly keeps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from normlab import _kernels

    assert _kernels.available(), _kernels.status()
    libs = {"this": _kernels._lib(), "other": other_library(args.other)}
    n, c, length = (int(s) for s in args.shape.split(","))
    shape = (n, c, length) if args.layout == "cf" else (n, length, c)
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=g) * 2 + 0.5).to(getattr(torch, args.dtype))
    dy, start = torch.randn(shape, generator=g).to(x.dtype), torch.randn(shape, generator=g).to(x.dtype)
    out = torch.empty_like(x)
    flush = torch.empty(64 << 20, dtype=torch.uint8) if args.cold else None  # (twice the 32 MB L3 here)
    table = passes(x, dy, out, args.layout)
    names = list(table) if args.passes == "all" else args.passes.split(",")
    try:
        for name in names:
            run = table[name]
            got = {}
            for k, lib in libs.items():
                _kernels._state["lib"] = lib
                out.copy_(start)  # (the kept-gradient passes read out)
                res = run()
                res = res if isinstance(res, tuple) else () if res is None else (res,)
                got[k] = [t.clone() for t in (*res, out) if t is not None]
            same = all(torch.equal(p.view(torch.int16) if p.element_size() == 2 else p,
                                   q.view(torch.int16) if q.element_size() == 2 else q)
                       for p, q in zip(got["this"], got["other"]))
            times: dict = {k: [] for k in libs}
            for r in range(args.rounds):
                for k in (("this", "other") if r % 2 else ("other", "this")):
                    _kernels._state["lib"] = libs[k]
                    run()
                    if args.cold:
                        flush.fill_(r & 0xFF)
                        t0 = time.perf_counter()
                        run()
                        times[k].append(time.perf_counter() - t0)
                    else:
                        t0 = time.perf_counter()
                        run(), run()
                        times[k].append((time.perf_counter() - t0) / 2)
            this, other = (statistics.median(times[k]) * 1e3 for k in ("this", "other"))
            print(f"{name:17s} {args.dtype} {args.layout}: this {this:.3f} ms, other {other:.3f} ms, "
                  f"this/other {this / other:.2f}, outputs {'identical' if same else 'differ'}", flush=True)
    finally:
        _kernels._state["lib"] = libs["this"]


if __name__ == "__main__":
    main()
