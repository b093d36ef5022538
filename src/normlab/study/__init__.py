"""``normlab study``: which normalization for my network, at my batch size, at what cost.

``tasks`` (data + small models with a norm slot), ``config`` (one cell's frozen config), ``backends`` (where cells run: local processes; the
interface a Ray backend implements),
``train`` (one cell: a pure function of its config), ``runner`` (the grid, workers,
progress), ``store`` (SQLite), ``report`` and ``plots`` (tables, figures, recommendation).
"""

from .backends import Backend, Finished, LocalBackend, execute_cell, make_backend
from .config import CellConfig, scaled_lr
from .runner import build_grid, resolve_norms, run_grid
from .store import DEFAULT_DB, Store
from .tasks import DataMissingError, Task, get_task, task_names
from .train import CellResult, run_cell

__all__ = [
    "Backend",
    "Finished",
    "LocalBackend",
    "make_backend",
    "CellConfig",
    "CellResult",
    "DEFAULT_DB",
    "DataMissingError",
    "Store",
    "Task",
    "build_grid",
    "execute_cell",
    "get_task",
    "resolve_norms",
    "run_cell",
    "run_grid",
    "scaled_lr",
    "task_names",
]
