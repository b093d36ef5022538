"""A study cell as ``nproc`` processes: data-parallel training with DistributedDataParallel on
gloo, each process holding ``batch_size`` samples of every global batch of
``batch_size * nproc``, batch statistics synchronized over the processes (``sync``) or local.

``run_cell`` (in ``train``) is the one training loop; the helpers here are what it needs to
run inside a process group: which slice of a global batch is this process's, the model it
steps (converted and wrapped), and a loss value averaged over the processes (so that every
process takes the same decisions). Outside a process group they are the identity, and
``run_cell`` behaves as in one process.
"""

from __future__ import annotations

import datetime
import os
import pickle
import tempfile
import threading
import time
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor, nn

if TYPE_CHECKING:
    from .config import CellConfig
    from .tasks import Task
    from .train import CellResult

__all__ = ["rank_world", "parallel_model", "global_mean", "run_cell_multiprocess", "exit_with_parent", "is_gone"]


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def parallel_model(model: nn.Module, config: "CellConfig") -> nn.Module:
    """The module a training step calls: ``model`` itself in one process; in a group,
    ``model`` with synchronized statistics if ``config.sync``, wrapped in DDP (which averages
    gradients, and broadcasts rank 0's buffers before each forward)."""
    if rank_world()[1] == 1:
        return model
    from ..convert import convert_sync

    if config.sync:
        model = convert_sync(model)
    return nn.parallel.DistributedDataParallel(model)


def global_mean(loss: Tensor) -> float:
    """The loss as a float, averaged over the processes (equal batches: the global-batch loss)."""
    value = loss.detach().reshape(1).to(torch.float64)
    rank, world = rank_world()
    if world > 1:
        dist.all_reduce(value)
        value /= world
    return value.item()


def _worker(rank: int, config: "CellConfig", task: "Task | None", folder: str) -> None:
    from .train import run_cell

    dist.init_process_group("gloo", init_method=f"file://{folder}/store", rank=rank, world_size=config.nproc,
                            timeout=datetime.timedelta(minutes=10))
    try:
        result = run_cell(config, task)
        if rank == 0:
            with open(os.path.join(folder, "result.pkl"), "wb") as f:
                pickle.dump(result, f)
    finally:
        dist.destroy_process_group()


def run_cell_multiprocess(config: "CellConfig", task: "Task | None" = None) -> "CellResult":
    """Run one cell as ``config.nproc`` processes (each with ``config.threads`` torch threads)
    and return rank 0's result. A process that fails fails the cell, with its traceback."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(prefix="normlab-cell-") as folder:
        mp.start_processes(_worker, args=(config, task, folder), nprocs=config.nproc, start_method="spawn")
        with open(os.path.join(folder, "result.pkl"), "rb") as f:
            return pickle.load(f)


def is_gone(pid: int) -> bool:
    """True if process ``pid`` has ended, reaped or not: a zombie (dead, its exit status not
    yet collected, e.g. while its caller still reads its pipes) counts as gone, although
    ``os.kill(pid, 0)`` succeeds on it."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's (pid reused): not ours to judge
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]  # the field after "(command name)"
        return state in (b"Z", b"X")
    except (OSError, IndexError):  # no /proc (macOS): the parent-pid check below still holds
        return False


def exit_with_parent(pid: int, interval: float = 0.5) -> None:
    """Worker initializer: leave (``os._exit``) within about ``interval`` seconds of the
    study process ``pid`` ending (SIGKILL included, reaped or a zombie), or of this worker's
    own parent (the forkserver) ending and this worker being adopted by another process.
    A pool worker would otherwise wait for work forever, holding its caller's pipes open."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval)
            if os.getppid() != parent or is_gone(pid):
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="normlab-exit-with-parent").start()
