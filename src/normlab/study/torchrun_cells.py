"""``normlab study --nproc W`` launched by torchrun, on one machine or several: every one of
the W processes runs the command; together they train each cell as one data-parallel run
(``run_cell`` inside the process group: each rank its share of every global batch, batch
statistics synchronized with ``--sync on``). Rank 0 is the driver: it alone reads and
writes the store, and hands each cell to the others (a broadcast) as its backend runs it;
the other ranks follow until rank 0 says the grid is done.

    torchrun --nnodes 2 --nproc-per-node 1 --node-rank R --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29400 --rdzv-id study -m normlab.cli -- study --nproc 2 --sync on ...

CPU processes, gloo (the study's models are CPU-sized).
"""

from __future__ import annotations

import datetime
import os
from collections import deque
from typing import TYPE_CHECKING, Iterator

import torch.distributed as dist

from .backends import Finished, _error_line
from .config import CellConfig

if TYPE_CHECKING:
    from .tasks import Task

__all__ = ["launched_by_torchrun", "join_group", "TorchrunBackend", "follow"]


def launched_by_torchrun() -> bool:
    """Whether this process is one of a torchrun launch (its rank and world in the environment)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"))


def join_group(nproc: int) -> int:
    """Join the launch's process group (gloo, ``env://``); its size must be ``nproc``. Returns the rank."""
    world = int(os.environ["WORLD_SIZE"])
    if world != nproc:
        raise ValueError(f"torchrun started {world} processes but --nproc is {nproc}: a cell's processes are the "
                         f"launch's processes (give --nproc {world})")
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))
    return dist.get_rank()


class TorchrunBackend:
    """Rank 0's backend: one cell at a time, run by every rank of the launch; rank 0's result."""

    slots = 1

    def __init__(self) -> None:
        self._queue: deque[CellConfig] = deque()
        self._current: list[CellConfig] = []
        self._closed = False

    def submit(self, config: CellConfig, task: "Task | None" = None) -> None:
        if task is not None:
            raise ValueError("torchrun backend: cells of a task object (normlab.compare) are not supported; "
                             "use a task found by name (--task NAME or pkg.module:factory)")
        if config.nproc != dist.get_world_size():
            raise ValueError(f"torchrun backend: cell {config.label()} has nproc={config.nproc}, the launch "
                             f"{dist.get_world_size()} processes")
        self._queue.append(config)

    def running(self) -> list[CellConfig]:
        return self._current or list(self._queue)[:1]

    def as_completed(self) -> Iterator[Finished]:
        from .train import run_cell

        while self._queue:
            config = self._queue.popleft()
            self._current = [config]
            dist.broadcast_object_list([config], src=0)
            try:
                done = Finished(config, run_cell(config))
            except Exception as e:  # noqa: BLE001 (reported; the other ranks raised too and go on)
                done = Finished(config, None, _error_line(e))
            self._current = []
            yield done

    def close(self) -> None:
        """Tell the other ranks the grid is done (once)."""
        self._queue.clear()
        if not self._closed and dist.is_initialized():
            dist.broadcast_object_list([None], src=0)
            dist.destroy_process_group()
        self._closed = True

    def __enter__(self) -> "TorchrunBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def follow() -> int:
    """Ranks other than 0: run each cell rank 0 sends, until it sends ``None``; exit status 0."""
    from .train import run_cell

    while True:
        box: list[CellConfig | None] = [None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            break
        try:
            run_cell(box[0])
        except Exception:  # noqa: BLE001 (rank 0 fails the same way and reports it)
            pass
    dist.destroy_process_group()
    return 0
