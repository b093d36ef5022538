"""One study cell: train a task's model with one norm at one batch size, and measure it.

``run_cell(config)`` is a pure function of its ``CellConfig`` (it reads no globals and
writes nothing), so it runs as well in a worker process or on another machine.

Protocol (as the group-norm paper's batch-size study): the same number of epochs for every
batch size; SGD with momentum at a learning rate scaled from ``base_lr`` by the batch size
(linear by default) with a cosine decay; the last incomplete batch of an epoch is dropped;
evaluation in the model's eval mode at a fixed evaluation batch size on a validation split
fixed by the seed. A non-finite loss stops the run, which is recorded as diverged.
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from . import multiproc
from .config import CellConfig
from .tasks import Split, Task, get_task

__all__ = ["CellResult", "run_cell", "saved_bytes_per_sample", "check_cell"]


@dataclass(frozen=True)
class CellResult:
    status: str  # "ok" or "diverged"
    metric: str  # "error" or "rmse"
    val_metric: float | None  # None when diverged
    final_train_loss: float | None  # mean over the last epoch
    median_step_s: float
    saved_bytes_per_sample: float
    param_count: int
    steps: int
    train_size: int
    val_size: int
    lr: float
    wall_s: float
    # learning curve: (epoch, mean train loss since the previous point, validation metric)
    curve: tuple[tuple[float, float | None, float | None], ...] = field(default_factory=tuple)


def check_cell(config: CellConfig, task: Task | None = None) -> Split:
    """Load the cell's data and check the batch fits in it; clear errors otherwise."""
    task = task or get_task(config.task)
    split = task.split(config.seed, config.val_fraction, config.val_max, config.train_subset, config.data_dir)
    n = len(split.x_train)
    if config.global_batch_size > n:
        raise ValueError(f"batch size {config.global_batch_size} is larger than the training set of task "
                         f"{config.task!r} ({n} examples{' after --train-subset' if config.train_subset else ''})")
    return split


def saved_bytes_per_sample(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor) -> float:
    """Bytes autograd keeps for the backward of one training step, per sample.

    Every tensor saved for backward is caught with ``torch.autograd.graph.saved_tensors_hooks``
    and its storage counted once (views share a storage); parameters are left out (they are
    held anyway). Runs on a copy of the model, so running statistics are untouched.
    """
    m = copy.deepcopy(model).train()
    params = {p.untyped_storage().data_ptr() for p in m.parameters()}
    seen: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        s = t.untyped_storage()
        ptr = s.data_ptr()
        if ptr and ptr not in params:
            seen[ptr] = s.nbytes()
        return t

    x, y = x.clone(), y.clone()  # a slice would share (and count) the whole data set's storage
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_fn(m(x), y)
    del loss
    return sum(seen.values()) / len(x)


def _evaluate(model: nn.Module, task: Task, split: Split, batch: int) -> tuple[float, float]:
    """(validation metric, validation loss) in eval mode, at a fixed evaluation batch size."""
    was = model.training
    model.eval()
    with torch.no_grad():
        out = torch.cat([model(split.x_val[i:i + batch]) for i in range(0, len(split.x_val), batch)])
        metric, loss = task.score(out, split.y_val, split), task.loss(out, split.y_val).item()
    model.train(was)
    return metric, loss


def run_cell(config: CellConfig, task: Task | None = None) -> CellResult:
    """Train and measure one cell; see the module docstring for the protocol. ``task``: the
    task object (a user's, from ``normlab.compare``); default ``get_task(config.task)``."""
    t_start = time.perf_counter()
    torch.set_num_threads(config.threads)
    task = task or get_task(config.task)
    split = check_cell(config, task)
    n, bs = len(split.x_train), config.batch_size
    gbs, (rank, _) = config.global_batch_size, multiproc.rank_world()  # nproc > 1: this process's share
    torch.manual_seed(config.seed)
    model = task.build_model(config.norm, config.width)
    model.train()
    param_count = sum(p.numel() for p in model.parameters())
    saved = saved_bytes_per_sample(model, task.loss, split.x_train[:bs], split.y_train[:bs])
    step_model = multiproc.parallel_model(model, config)  # model itself in one process

    lr = config.lr
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay)
    per_epoch = n // gbs
    total = per_epoch * config.epochs
    marks = {max(1, round(k * per_epoch / config.curve_points)) for k in range(1, config.curve_points + 1)}
    gen = torch.Generator().manual_seed(config.seed)

    m0, _ = _evaluate(model, task, split, config.eval_batch_size)
    curve: list[tuple[float, float | None, float | None]] = [(0.0, None, m0)]
    step_times: list[float] = []
    window: list[float] = []
    last_epoch: list[float] = []
    status, step = "ok", 0
    for epoch in range(config.epochs):
        perm = torch.randperm(n, generator=gen)
        last_epoch = []
        for i in range(per_epoch):
            if config.schedule == "cosine":
                for g in opt.param_groups:
                    g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            idx = perm[i * gbs:(i + 1) * gbs][rank * bs:(rank + 1) * bs]
            xb, yb = split.x_train[idx], split.y_train[idx]
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss = task.loss(step_model(xb), yb)
            loss.backward()
            opt.step()
            step_times.append(time.perf_counter() - t0)
            step += 1
            value = multiproc.global_mean(loss)  # loss.item(), averaged over processes
            if not math.isfinite(value):
                status = "diverged"
                break
            window.append(value)
            last_epoch.append(value)
            if (i + 1) in marks:
                metric, _ = _evaluate(model, task, split, config.eval_batch_size)
                curve.append((epoch + (i + 1) / per_epoch, statistics.fmean(window), metric))
                window = []
        if status != "ok":
            break

    val_metric: float | None = None
    if status == "ok":
        val_metric = curve[-1][2]
        if val_metric is None or not math.isfinite(val_metric):
            status, val_metric = "diverged", None
    return CellResult(
        status=status,
        metric=task.metric,
        val_metric=val_metric,
        final_train_loss=statistics.fmean(last_epoch) if status == "ok" and last_epoch else None,
        median_step_s=statistics.median(step_times),
        saved_bytes_per_sample=saved,
        param_count=param_count,
        steps=step,
        train_size=n,
        val_size=len(split.x_val),
        lr=lr,
        wall_s=time.perf_counter() - t_start,
        curve=tuple((e, l, v if v is None or math.isfinite(v) else None) for e, l, v in curve),
    )
