"""Train a small CNN on the sklearn digits with DistributedDataParallel and any normlab norm,
with batch statistics synchronized across processes or kept local.

    torchrun --nproc_per_node 2 examples/ddp_train.py --norm bn --sync
    torchrun --nproc_per_node 2 examples/ddp_train.py --norm bn --no-sync --batch-size 4

Across machines (here two, one process each; run the same line on both, with its own node
rank; HOST is the first machine's address, reachable from the other):

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank 0 --rdzv-backend c10d \
        --rdzv-endpoint HOST:29400 --rdzv-id digits examples/ddp_train.py --norm bn --sync

Runs on the CPU with gloo (NCCL and one GPU per process when CUDA is available). Each
process sees ``--batch-size`` samples per step, so the global batch is ``nproc`` times that;
with ``--sync`` every batch-statistic norm (bn, mobn, brn, bin, sn) normalizes with the
moments of the global batch, as one process holding all of it would. Without torchrun it
runs as a single process.
"""

from __future__ import annotations

import argparse
import datetime
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import normlab


def digits() -> tuple[TensorDataset, TensorDataset]:
    """The 1797 8x8 sklearn digits (bundled with scikit-learn, no download), split 80/20."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    cut = int(0.8 * len(y))
    return TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])


def cnn(norm: str, width: int = 16) -> nn.Module:
    def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), normlab.make_norm(norm, cout), nn.ReLU()]

    return nn.Sequential(*block(1, width, 1), *block(width, 2 * width, 2), *block(2 * width, 2 * width, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, 10))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--norm", default="bn", help="a normlab spec (normlab list): bn, gn:4, sn, bin, ...")
    p.add_argument("--sync", action=argparse.BooleanOptionalAction, default=True,
                   help="synchronize batch statistics across processes (default: on)")
    p.add_argument("--batch-size", type=int, default=16, help="samples per process per step")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=300,
                   help="seconds a process waits for the others in a collective before it raises")
    p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: run every epoch)")
    p.add_argument("--dump", help="rank 0 saves the trained model's state_dict and its test-set outputs here "
                                  "(torch.save) at the end")
    args = p.parse_args()

    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29511")):
        os.environ.setdefault(key, value)  # a plain `python ddp_train.py` is one process
    cuda = torch.cuda.is_available()
    # a bounded wait: if another process dies, this one raises after the timeout instead of hanging
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=args.timeout))
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
    if not cuda:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world))))

    torch.manual_seed(args.seed)  # the same initial weights on every process
    train, test = digits()
    model = cnn(args.norm).to(device)
    if args.sync:
        model = normlab.convert_sync(model)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"{world} process(es) x batch {args.batch_size} = global batch {world * args.batch_size}; "
              f"norm {args.norm}, batch statistics {'synchronized' if args.sync else 'local'}")

    step = 0
    for epoch in range(args.epochs):
        if args.steps and step >= args.steps:
            break
        sampler.set_epoch(epoch)
        ddp.train()
        start, total, seen = time.perf_counter(), torch.zeros(2, device=device), 0
        for x, y in loader:
            if args.steps and step >= args.steps:
                break
            step += 1
            x, y = x.to(device), y.to(device)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += torch.stack([loss.detach() * len(y), torch.tensor(float(len(y)), device=device)])
            seen += 1
        dist.all_reduce(total)  # mean training loss over every process's samples
        ddp.eval()  # eval uses the running statistics: no communication
        with torch.no_grad():
            xs, ys = test.tensors
            acc = (model(xs.to(device)).argmax(1) == ys.to(device)).float().mean().item()
        if rank == 0:
            print(f"epoch {epoch + 1}: train loss {total[0].item() / total[1].item():.4f}  "
                  f"test accuracy {acc:.3f}  ({seen} steps, {time.perf_counter() - start:.1f} s)")
    if args.dump and rank == 0:
        with torch.no_grad():
            outputs = model.eval()(test.tensors[0].to(device))
        torch.save({"state": {k: v.cpu() for k, v in model.state_dict().items()}, "outputs": outputs.cpu(),
                    "world": world, "steps": step}, args.dump)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
