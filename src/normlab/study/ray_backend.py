"""Study cells on a Ray cluster (or a Ray instance on this machine): each cell is one Ray
task running the same ``execute_cell`` as the local backend; only the driver
(``runner.run_grid``) writes the store.

- Placement: a cell asks Ray for ``nproc * cpus_per_cell`` CPUs (default ``cpus_per_cell``:
  the cell's torch ``threads``); a cell with ``nproc > 1`` is one task that starts its own
  processes (``multiproc``), so they always sit on one node.
- Data: a task found by name (``task=None``) loads or generates its data on the worker; a
  ``Task`` object (``normlab.compare``'s model and data) goes into Ray's object store once
  (``ray.put``) and every cell gets the reference.
- Failures: a cell whose worker dies (killed, out of memory, node lost) is run again, at
  most ``MAX_RETRIES`` times; a cell that raises is not retried (it is deterministic). Either
  way it comes back as an error line and the grid goes on.
- The driver keeps only as many cells in flight as the cluster has CPUs for (looked up again
  as the grid goes, so nodes that join are used), so ``running()`` is what runs and the
  rest is queued; a killed driver takes its in-flight cells with it (Ray ends a job's tasks
  when the job's driver dies), and the rerun resubmits whatever is not stored.
"""

from __future__ import annotations

import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Iterator

from .backends import Finished, execute_cell
from .config import CellConfig

if TYPE_CHECKING:
    from .tasks import Task
    from .train import CellResult

__all__ = ["RayBackend", "make_ray_backend", "MAX_RETRIES", "INSTALL_HINT"]

MAX_RETRIES = 2  # a cell whose worker dies runs at most 1 + 2 times
INSTALL_HINT = "pip install 'normlab[ray]' (or: pip install ray==2.60.0)"
_RESOURCES_EVERY_S = 5.0  # how often the driver asks the cluster for its CPU count


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as err:
        raise ImportError(f"backend 'ray' needs Ray, which is not installed here ({err}); install the extra: "
                          f"{INSTALL_HINT}") from None
    return ray


def _cell(config: CellConfig, task: "Task | None") -> "CellResult":
    """The Ray task's body (a Task given by reference arrives here resolved)."""
    return execute_cell(config, task)


def _one_line(err: BaseException, retries: int) -> str:
    """``ExcType: message`` on one line; for a cell that raised, the cell's own exception."""
    ray = _import_ray()
    if isinstance(err, ray.exceptions.RayTaskError) and isinstance(getattr(err, "cause", None), BaseException):
        err = err.cause
    text = " ".join(str(err).split())
    if len(text) > 400:
        text = text[:400] + " ..."
    line = f"{type(err).__name__}: {text}"
    if isinstance(err, ray.exceptions.RayError) and not isinstance(err, ray.exceptions.RayTaskError):
        line += f" (after {retries} retries)"
    return line


class RayBackend:
    """Cells as Ray tasks. ``address``: ``None`` starts Ray on this machine with its CPUs
    (``available_cores``); ``"auto"`` joins the cluster this machine belongs to (``ray
    start``); ``"ray://host:port"`` connects through Ray Client. If this process is already
    connected to Ray (``ray.init`` was called), that connection is used and left open."""

    def __init__(self, address: str | None = None, cpus_per_cell: float | None = None,
                 max_retries: int = MAX_RETRIES) -> None:
        if cpus_per_cell is not None and cpus_per_cell <= 0:
            raise ValueError(f"ray backend: cpus_per_cell must be > 0, got {cpus_per_cell}")
        if max_retries < 0:
            raise ValueError(f"ray backend: max_retries must be >= 0, got {max_retries}")
        ray = self._ray = _import_ray()
        self._owns = not ray.is_initialized()
        if self._owns:
            os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage report sent anywhere
            from .runner import available_cores

            try:
                if address is None:
                    ray.init(num_cpus=available_cores(), include_dashboard=False)
                else:
                    ray.init(address=address)
            except (ConnectionError, RuntimeError, ValueError) as err:
                where = "a Ray instance on this machine" if address is None else f"the Ray cluster at {address!r}"
                raise ValueError(f"ray backend: cannot start or join {where}: {type(err).__name__}: {err}") from None
        self.cpus_per_cell = cpus_per_cell
        self._remote = ray.remote(_cell)
        self._retries = max_retries
        self._queue: deque[tuple[CellConfig, Any]] = deque()
        self._flying: dict[Any, tuple[CellConfig, float]] = {}  # object ref -> (config, CPUs)
        self._task_refs: dict[int, tuple[Task, Any]] = {}  # id(task) -> (task kept alive, its object ref)
        self._cpus, self._cpus_at = 0.0, -_RESOURCES_EVERY_S
        self._rejected: list[Finished] = []  # cells larger than the cluster

    # ------------------------------------------------------------------ sizes
    def _cluster_cpus(self) -> float:
        now = time.monotonic()
        if now - self._cpus_at >= _RESOURCES_EVERY_S:
            self._cpus, self._cpus_at = float(self._ray.cluster_resources().get("CPU", 0.0)), now
        return self._cpus

    def cpus_for(self, config: CellConfig) -> float:
        """The CPUs a cell asks Ray for: ``nproc`` processes of ``cpus_per_cell`` (default: its threads)."""
        return config.nproc * (self.cpus_per_cell if self.cpus_per_cell is not None else config.threads)

    @property
    def slots(self) -> int:  # type: ignore[override]
        """Cells of ``cpus_per_cell`` (default 1) CPU that fit in the cluster at once."""
        return max(1, int(self._cluster_cpus() // (self.cpus_per_cell or 1)))

    # ------------------------------------------------------------------ interface
    def submit(self, config: CellConfig, task: "Task | None" = None) -> None:
        ref = None
        if task is not None:
            held = self._task_refs.get(id(task))
            if held is None:
                held = self._task_refs[id(task)] = (task, self._ray.put(task))  # once per task, not per cell
            ref = held[1]
        self._queue.append((config, ref))

    def running(self) -> list[CellConfig]:
        return [c for c, _ in self._flying.values()]

    def _fill(self) -> None:
        used = sum(n for _, n in self._flying.values())
        capacity = self._cluster_cpus()
        while self._queue:
            config, ref = self._queue[0]
            need = self.cpus_for(config)
            if 0 < capacity < need:  # Ray would wait for it forever (0: no node has joined yet, wait)
                self._queue.popleft()
                self._rejected.append(Finished(config, None, f"ValueError: the cell needs {need:g} CPUs (nproc x "
                                               f"cpus_per_cell), the Ray cluster has {capacity:g}"))
                continue
            if self._flying and used + need > capacity:
                break  # the rest waits here (queued), not in Ray's scheduler
            self._queue.popleft()
            handle = self._remote.options(num_cpus=need, max_retries=self._retries, retry_exceptions=False)
            self._flying[handle.remote(config, ref)] = (config, need)
            used += need

    def as_completed(self) -> Iterator[Finished]:
        ray = self._ray
        while self._queue or self._flying or self._rejected:
            self._fill()
            while self._rejected:
                yield self._rejected.pop(0)
            if not self._flying:
                continue
            ready, _ = ray.wait(list(self._flying), num_returns=1, timeout=_RESOURCES_EVERY_S)
            finished = []
            for ref in ready:
                config, _ = self._flying.pop(ref)
                try:
                    finished.append(Finished(config, ray.get(ref)))
                except Exception as err:  # noqa: BLE001 (reported, the grid goes on)
                    finished.append(Finished(config, None, _one_line(err, self._retries)))
            if finished:
                self._fill()  # the next cells start before the driver stores these (running() is current)
            yield from finished + self._rejected
            self._rejected.clear()

    def close(self) -> None:
        self._queue.clear()
        for ref in list(self._flying):
            try:
                self._ray.cancel(ref, force=True)
            except Exception:  # noqa: BLE001 (already finished or gone)
                pass
        self._flying.clear()
        self._task_refs.clear()
        if self._owns and self._ray.is_initialized():
            self._ray.shutdown()
        self._owns = False

    def __enter__(self) -> "RayBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_ray_backend(workers: int = 1, address: str | None = None, *, cpus_per_cell: float | None = None,
                     max_retries: int = MAX_RETRIES, **options: Any) -> RayBackend:
    """The ``"ray"`` backend (``make_backend("ray", address=...)``). ``workers`` is the local
    backend's process count and does not apply: the cluster's CPUs decide how many cells run
    at once, each taking ``nproc * cpus_per_cell`` of them."""
    if options:
        raise ValueError(f"ray backend: unknown options {sorted(options)} (known: cpus_per_cell, max_retries)")
    return RayBackend(address=address, cpus_per_cell=cpus_per_cell, max_retries=max_retries)
