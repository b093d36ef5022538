"""Speed and saved memory of the element-wise norms (dyt, derf) and of norm + activation,
against their torch baselines, in one process, alternating (order reversed every round).

    PYTHONPATH=src python3 examples/modern_speed.py [threads] [rounds]

Reports medians of training forward+backward and ratios. ``normlab bench`` times the same
rows with their goals ("at most 1.5x a torch.tanh forward+backward" for dyt/derf, 0.8x the
norm then the activation for the fused pairs: ``normlab bench --norms dyt,derf,bn+relu,gn+silu``),
with paired intervals and an A/A control; this script is the short standalone version.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as TF

import normlab


def fwd_bwd(fn, x):
    def run():
        xx = x.detach().requires_grad_()
        y = fn(xx)
        y.backward(torch.ones_like(y))
    return run


def measure(cases: dict, rounds: int) -> dict:
    times = {k: [] for k in cases}
    for f in cases.values():
        f()
    order = list(cases)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            t0 = time.perf_counter()
            cases[k]()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def saved_mib(fn, x) -> float:
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(x.detach().requires_grad_())
    return sum(total) / 2**20


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 30
    x = torch.randn(32, 196, 384)  # a ViT-S activation, channels last
    dyt = normlab.make_norm("dyt", 384, channel_dim=-1)
    derf = normlab.make_norm("derf", 384, channel_dim=-1)
    a, w, b = (p.detach().clone().requires_grad_() for p in (dyt.alpha, dyt.weight, dyt.bias))
    chain = lambda t: w * torch.tanh(a * t) + b  # noqa: E731  (DyT as the official code writes it)
    cases = {"torch.tanh": fwd_bwd(torch.tanh, x), "x.clone()*1": fwd_bwd(lambda t: t * 1.0, x),
             "dyt": fwd_bwd(dyt, x), "derf": fwd_bwd(derf, x), "dyt as torch ops": fwd_bwd(chain, x)}
    res = measure(cases, rounds)
    print(f"# element-wise: x {tuple(x.shape)} float32, training fwd+bwd, {torch.get_num_threads()} thread(s), "
          f"median of {rounds}")
    for k, v in res.items():
        print(f"{k:22s} {v * 1e3:8.2f} ms   {v / res['torch.tanh']:.2f}x torch.tanh   saved "
              f"{saved_mib(cases_fn(k, dyt, derf, chain), x):.1f} MiB")
    xc = torch.randn(32, 64, 56, 56)
    bn = normlab.make_norm("bn", 64)
    bn_relu = normlab.make_norm("bn", 64, act="relu")
    tbn = torch.nn.BatchNorm2d(64)
    abn = normlab.make_norm("bn", 64, act="leaky_relu", inplace_abn=True)
    fns = {"normlab bn, then relu": lambda t: TF.relu(bn(t)), "make_norm bn act=relu": bn_relu,
           "torch bn, then leaky": lambda t: TF.leaky_relu(tbn(t)), "normlab bn, then leaky": lambda t: TF.leaky_relu(bn(t)),
           "inplace_abn (leaky)": abn}
    res = measure({k: fwd_bwd(f, xc) for k, f in fns.items()}, rounds)
    print(f"# norm + activation: x {tuple(xc.shape)} float32, training fwd+bwd (input {xc.numel() * 4 / 2**20:.0f} MiB)")
    for k, v in res.items():
        print(f"{k:22s} {v * 1e3:8.2f} ms   saved {saved_mib(fns[k], xc):.0f} MiB")
    print(f"act=relu / (bn, then relu): {res['make_norm bn act=relu'] / res['normlab bn, then relu']:.2f}")
    print(f"inplace_abn / (normlab bn, then leaky): {res['inplace_abn (leaky)'] / res['normlab bn, then leaky']:.2f}")
    print(f"inplace_abn / (torch bn, then leaky): {res['inplace_abn (leaky)'] / res['torch bn, then leaky']:.2f}")


def cases_fn(name, dyt, derf, chain):
    return {"torch.tanh": torch.tanh, "x.clone()*1": lambda t: t * 1.0, "dyt": dyt, "derf": derf,
            "dyt as torch ops": chain}[name]


if __name__ == "__main__":
    main()
