"""What synchronized batch statistics cost per call: two gloo processes on the CPU, each
running batch norm forward + backward on its own (N, C, H, W) batch, synchronized vs local.

    python examples/sync_cost.py                       # (16, 64, 28, 28) per process
    python examples/sync_cost.py --shape 16,64,7,7 --rounds 200

Candidates alternate within each round (ABBA order), each call starts after a barrier, and
rank 0 prints medians. "collectives only" is the two collectives a synchronized layer adds
(one all_gather of (count, mean, M2) forward, one all_reduce of 2C gradients backward) on
moments alone, so "synchronized - local" should be close to it. Batch norm synchronizes on
normlab's compiled CPU kernels like its local fast path; "plain path" rows are the autograd
reference path (what synchronized layers take without the kernels). One torch thread per process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import normlab
from normlab.distributed import WORLD, all_reduce_moments
from normlab._moments import Moments


def _worker(rank: int, folder: str, shape: tuple[int, ...], rounds: int, threads: int) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=2)
    torch.manual_seed(rank)
    x = torch.randn(shape, requires_grad=True)
    dy = torch.randn(shape)
    c = shape[1]
    layers = {"torch BatchNorm2d (local)": nn.BatchNorm2d(c), "normlab bn, local": normlab.BatchNorm(c),
              "normlab bn, synchronized": normlab.BatchNorm(c, process_group=WORLD)}

    def step(layer: nn.Module) -> Callable[[], None]:
        def run() -> None:
            layer(x).backward(dy)
            x.grad = None
        return run

    moments = Moments(float(x.numel() // c), torch.randn(1, c, 1, 1, requires_grad=True),
                      torch.rand(1, c, 1, 1, requires_grad=True))

    def collectives() -> None:
        g = all_reduce_moments(moments, WORLD)
        (g.mean.sum() + g.m2.sum()).backward()

    cands = {name: step(layer) for name, layer in layers.items()}
    from normlab.functional import fast_path

    def plain(name: str) -> Callable[[], None]:
        def run() -> None:
            with fast_path(False):  # the autograd reference path
                cands[name]()
        return run

    cands["normlab bn, local, plain path"] = plain("normlab bn, local")
    cands["normlab bn, synchronized, plain path"] = plain("normlab bn, synchronized")
    cands["collectives only"] = collectives
    names = list(cands)
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds + 3):
        for k in names if r % 2 == 0 else names[::-1]:
            dist.barrier()
            t = time.perf_counter()
            cands[k]()
            if r >= 3:  # three warm-up rounds
                times[k].append(time.perf_counter() - t)
    if rank == 0:
        local = statistics.median(times["normlab bn, local"])
        print(f"input {shape} per process, 2 gloo processes x {threads} thread(s), torch {torch.__version__}, "
              f"forward+backward, median of {rounds} rounds (ABBA):")
        for k in names:
            med = statistics.median(times[k])
            print(f"  {k:38s} {1e3 * med:8.3f} ms")
        sync = statistics.median(times["normlab bn, synchronized"])
        print(f"  synchronized - local: {1e3 * (sync - local):.3f} ms per call ({sync / local:.2f}x)")
        plain_l = statistics.median(times["normlab bn, local, plain path"])
        plain_s = statistics.median(times["normlab bn, synchronized, plain path"])
        print(f"  on the plain path: synchronized - local {1e3 * (plain_s - plain_l):.3f} ms per call")
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="16,64,28,28", help="per-process input shape N,C,H,W")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = p.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    with tempfile.TemporaryDirectory() as folder:
        mp.start_processes(_worker, args=(folder, shape, args.rounds, args.threads), nprocs=2, start_method="spawn")


if __name__ == "__main__":
    main()
