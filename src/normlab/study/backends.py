"""Where study cells run: a backend takes cell configurations and hands back, as each one
finishes, its result or its error. Only the driver (``runner.run_grid``) writes the store;
a backend never touches it, so any backend (local processes, a Ray cluster) can plug in.

The interface (``Backend``)::

    with make_backend("local", workers=2) as backend:
        for config, task in jobs:
            backend.submit(config, task)          # queue a cell; returns at once
        for done in backend.as_completed():       # every submitted cell once, as it finishes
            done.config, done.result, done.error  # result (CellResult) or error (one line)

``task`` is ``None`` for a task found by name (``get_task(config.task)``, built-in or
``module:factory``) or a ``Task`` object (``normlab.compare``'s user model and data), which a
backend running cells elsewhere must ship there (pickle). A cell with ``nproc > 1`` is still
one job: ``execute_cell`` starts its processes wherever the job runs.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, runtime_checkable

from .config import CellConfig

if TYPE_CHECKING:
    from .tasks import Task
    from .train import CellResult

__all__ = ["Backend", "Finished", "LocalBackend", "execute_cell", "make_backend", "BACKENDS"]


def execute_cell(config: CellConfig, task: "Task | None" = None) -> "CellResult":
    """Run one cell where its config says: in this process for ``nproc=1``, else as
    ``nproc`` data-parallel processes (``multiproc``; statistics synchronized if ``sync``)."""
    from .train import run_cell

    if config.nproc == 1:
        return run_cell(config, task)
    from .multiproc import run_cell_multiprocess

    return run_cell_multiprocess(config, task)


@dataclass(frozen=True)
class Finished:
    """One finished cell: its result, or (the cell raised) a one-line error."""

    config: CellConfig
    result: "CellResult | None"
    error: str | None = None


def _error_line(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


@runtime_checkable
class Backend(Protocol):
    """Runs cells; never writes the store. ``slots``: how many cells run at once."""

    slots: int

    def submit(self, config: CellConfig, task: "Task | None" = None) -> None:
        """Queue one cell (returns at once; the work may start now or in ``as_completed``)."""

    def as_completed(self) -> Iterator[Finished]:
        """Every submitted cell exactly once, in the order they finish (blocks until the next);
        a cell that raises comes back with ``error`` set and the others go on."""

    def running(self) -> list[CellConfig]:
        """The cells running now (for the progress line)."""

    def close(self) -> None:
        """Stop workers; cells not yet finished are abandoned."""

    def __enter__(self) -> "Backend": ...

    def __exit__(self, *exc: object) -> None: ...


class LocalBackend:
    """Cells on this machine: in this process (``workers=1``) or in ``workers`` worker
    processes (forkserver, each cell with ``config.threads`` torch threads). Cells run in the
    order submitted; submit the longest first so the workers finish together."""

    def __init__(self, workers: int = 1) -> None:
        if workers < 1:
            raise ValueError(f"local backend: workers must be >= 1, got {workers}")
        self.slots = workers
        self._queue: deque[tuple[CellConfig, Task | None]] = deque()
        self._flying: dict[Future, CellConfig] = {}
        self._current: list[CellConfig] = []
        self._pool: ProcessPoolExecutor | None = None

    def submit(self, config: CellConfig, task: "Task | None" = None) -> None:
        self._queue.append((config, task))

    def running(self) -> list[CellConfig]:
        if self.slots > 1:
            return list(self._flying.values())
        return self._current or [c for c, _ in list(self._queue)[:1]]  # the one running, or the next

    def as_completed(self) -> Iterator[Finished]:
        if self.slots == 1:
            yield from self._serial()
        else:
            yield from self._parallel()

    def _serial(self) -> Iterator[Finished]:
        while self._queue:
            config, task = self._queue.popleft()
            self._current = [config]
            try:
                done = Finished(config, execute_cell(config, task))
            except Exception as e:  # noqa: BLE001 (reported, the grid goes on)
                done = Finished(config, None, _error_line(e))
            self._current = []
            yield done

    def _start_pool(self) -> ProcessPoolExecutor:
        from .multiproc import exit_with_parent

        ctx = multiprocessing.get_context("forkserver")
        # workers fork from a server that has imported these once (torch._dynamo: torch's
        # is_compiling() imports it on first use, about a second per process)
        ctx.set_forkserver_preload(["normlab.study.train", "sklearn.datasets", "torch._dynamo"])
        return ProcessPoolExecutor(max_workers=self.slots, mp_context=ctx, initializer=exit_with_parent,
                                   initargs=(os.getpid(),))

    def _parallel(self) -> Iterator[Finished]:
        while self._queue or self._flying:
            while self._queue and len(self._flying) < self.slots:
                if self._pool is None:
                    self._pool = self._start_pool()
                config, task = self._queue.popleft()
                self._flying[self._pool.submit(execute_cell, config, task)] = config
            done, _ = wait(self._flying, return_when=FIRST_COMPLETED)
            for f in done:
                config = self._flying.pop(f)
                err = f.exception()
                yield Finished(config, None, _error_line(err)) if err else Finished(config, f.result())

    def close(self) -> None:
        self._queue.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._flying.clear()

    def __enter__(self) -> "LocalBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _local(workers: int = 1, address: str | None = None) -> LocalBackend:
    if address is not None:
        raise ValueError(f"backend 'local' runs on this machine and takes no address (got address={address!r})")
    return LocalBackend(workers)


# name -> a factory ``f(workers=..., address=..., **options) -> Backend``, or "module:attr"
# naming one (imported when first asked for: the module may be absent from this build)
BACKENDS: dict[str, Callable[..., Backend] | str] = {
    "local": _local,
    "ray": "normlab.study.ray_backend:make_ray_backend",
}


def make_backend(name: str = "local", *, workers: int = 1, address: str | None = None, **options: Any) -> Backend:
    """The backend called ``name``: ``"local"`` (this machine), or another in ``BACKENDS``."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(sorted(BACKENDS))}")
    factory = BACKENDS[name]
    if isinstance(factory, str):
        import importlib

        module, _, attr = factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"backend {name!r} is not available in this installation ({factory}: "
                             f"{type(err).__name__}: {err})") from None
    return factory(workers=workers, address=address, **options)
