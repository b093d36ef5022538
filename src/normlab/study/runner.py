"""The study grid: norms x batch sizes x seeds of one task, run cell by cell (or in worker
processes), each finished cell stored at once; cells already in the database are skipped.

Where cells run is a backend (``backends``: local processes; others plug in behind the same
interface); this driver submits the cells, and stores each result as it comes back: it is
the only writer of the store. The runner never plots.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, TextIO

import torch

from .backends import Backend, execute_cell, make_backend
from .config import CellConfig
from .store import Store, StoreError
from .tables import record_failure
from .tasks import Task
from .train import CellResult, check_cell

__all__ = ["execute_cell", "resolve_norms", "build_grid", "run_grid", "GridOutcome", "available_cores",
           "DEFAULT_BATCH_SIZES"]

DEFAULT_BATCH_SIZES = Task.default_batch_sizes  # a task may choose its own


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _probe(task: Task, spec: str, width: int) -> None:
    """Build the model with ``spec`` and run it on two random examples in train and eval mode."""
    model = task.build_model(spec, width)
    x = torch.randn(2, *task.input_shape)
    with torch.no_grad():
        model.train()(x)
        model.eval()(x)


def resolve_norms(task: Task, norms: list[str] | None, width: int = 16) -> tuple[list[str], list[str]]:
    """The norm specs to study and notes on the ones left out.

    ``None``: every registered norm that applies to the task's kind of network, leaving out
    (with a note) any whose layer cannot run in the task's model. Named norms must all run:
    an unknown or unusable one is an error.
    """
    if norms is None:
        specs, notes = [], []
        for spec in task.default_norms():
            try:
                _probe(task, spec, width)
                specs.append(spec)
            except Exception as err:  # a new norm that does not fit this model: say so, go on
                notes.append(f"left out {spec}: {type(err).__name__}: {err}")
        return specs, notes
    full = []
    for spec in norms:
        try:
            full.append(task.full_spec(spec))  # a bare gn: the task's group count
            _probe(task, full[-1], width)
        except ValueError as err:
            raise ValueError(f"norm {spec!r} for task {task.name!r}: {err}") from None
    return list(dict.fromkeys(full)), []


def build_grid(task: str, norms: list[str], batch_sizes: list[int], seeds: list[int], task_obj: Task | None = None,
               **fields: object) -> list[CellConfig]:
    """Every (norm, batch size, seed) cell, the other config fields shared; each checked to
    fit its data (a batch larger than the training set is an error before anything runs).
    ``task_obj``: the task when it is not found by name (``normlab.compare``)."""
    cells = [CellConfig(task=task, norm=n, batch_size=b, seed=s, **fields)  # type: ignore[arg-type]
             for b in batch_sizes for n in norms for s in seeds]
    for c in {(c.seed, c.global_batch_size): c for c in cells}.values():
        check_cell(c, task_obj)
    return cells


def _cost(c: CellConfig, n_train: int) -> float:
    """A rough relative cost for the ETA: steps, each dearer with a bigger batch, plus evaluations."""
    steps = c.epochs * (n_train // c.global_batch_size)
    return steps * (1 + c.global_batch_size / 32) + 5 * c.epochs * c.curve_points + 20


@dataclass
class GridOutcome:
    total: int
    skipped: int  # already in the database
    ran: list[tuple[CellConfig, CellResult]] = field(default_factory=list)
    failed: list[tuple[CellConfig, str]] = field(default_factory=list)
    wall_s: float = 0.0


class Progress:
    """One status line on stderr: a bar, cells done, the current cell(s), elapsed, ETA."""

    def __init__(self, total_cost: float, n: int, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.total, self.n, self.done, self.k = total_cost, n, 0.0, 0
        self.t0 = time.perf_counter()

    def update(self, running: list[CellConfig], finished: CellConfig | None = None, cost: float = 0.0,
               note: str = "") -> None:
        if finished is not None:
            self.done += cost
            self.k += 1
        elapsed = time.perf_counter() - self.t0
        frac = self.done / self.total if self.total else 1.0
        eta = _fmt(elapsed / frac * (1 - frac)) if self.done else "?"
        bar = "#" * int(20 * frac) + "-" * (20 - int(20 * frac))
        now = ", ".join(c.label() for c in running[:2]) + (" ..." if len(running) > 2 else "")
        if self.tty:
            line = (f"[{bar}] {self.k}/{self.n} cells, {len(running)} running, {self._queued(running)} queued | "
                    f"{now or 'done'} | {_fmt(elapsed)} elapsed, ETA {eta}")
            self.stream.write("\r" + line[:max(40, _columns() - 1)].ljust(_columns() - 1))
        elif finished is not None:
            self.stream.write(f"[{bar}] {self.k}/{self.n} {finished.label()}{note} | {len(running)} running, "
                              f"{self._queued(running)} queued | {_fmt(elapsed)} elapsed, ETA {eta}\n")
        self.stream.flush()

    def _queued(self, running: list[CellConfig]) -> int:
        return max(0, self.n - self.k - len(running))

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _columns() -> int:
    import shutil

    cols = shutil.get_terminal_size((120, 24)).columns
    return cols if cols >= 40 else 120


def _fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}"


def _note(result: CellResult) -> str:
    if result.status != "ok":
        return f" -> {result.status}"
    return f" -> {result.metric} {result.val_metric:.4g}"


def run_grid(cells: list[CellConfig], store: Store, workers: int = 1, progress: bool = True,
             on_result: Callable[[CellConfig, CellResult], None] | None = None,
             backend: Backend | None = None, task: Task | None = None) -> GridOutcome:
    """Run every cell whose key is not yet in ``store`` on ``backend`` (default: this
    machine, ``workers`` processes); store each result as it finishes: the driver (this
    function) is the only writer. ``task``: the cells' task object when it is not found by
    name (``normlab.compare``). A cell that raises is reported in ``failed``, the others go on.
    """
    t0 = time.perf_counter()
    have = store.keys()
    todo = [c for c in dict.fromkeys(cells) if c.key() not in have]
    sizes = {}
    for c in todo:
        if (c.task, c.seed, c.train_subset) not in sizes:
            sizes[(c.task, c.seed, c.train_subset)] = len(check_cell(c, task).x_train)
    cost = {c: _cost(c, sizes[(c.task, c.seed, c.train_subset)]) for c in todo}
    todo.sort(key=lambda c: -cost[c])  # the longest first: workers finish together
    out = GridOutcome(total=len(set(cells)), skipped=len(set(cells)) - len(todo))
    bar = Progress(sum(cost.values()), len(todo)) if progress and todo else None
    owned = backend is None
    backend = backend or make_backend("local", workers=workers)
    try:
        for c in todo:
            backend.submit(c, task)
        if bar:
            bar.update(todo[:backend.slots])
        for done in backend.as_completed():
            c, result = done.config, done.result
            if result is not None:
                store.write(c, result)
                out.ran.append((c, result))
                if on_result:
                    on_result(c, result)
            else:
                out.failed.append((c, done.error or "failed"))
                record_failure(store, c, done.error or "failed")  # kept, and retried by the next run
            if bar:
                bar.update(backend.running(), c, cost[c], _note(result) if result else f" -> FAILED: {done.error}")
    finally:
        if owned:
            backend.close()
        if bar:
            bar.close()
    out.wall_s = time.perf_counter() - t0
    return out
