"""Study results in SQLite: one row per finished run, its learning curve in a child table.

A run's row holds every field of its ``CellConfig`` plus its results, keyed by the config's
hash; the row and its curve are written in one transaction when the run ends, so a run
killed at any moment (SIGKILL included) leaves nothing behind and is redone next time. The
database is in WAL mode with a long busy timeout, so several studies may write to one file
at once; a cell finished by two of them is stored once (``INSERT OR IGNORE``).
"""

from __future__ import annotations

import dataclasses
import datetime
import socket
import sqlite3
from pathlib import Path
from typing import Any, Iterable

from .config import CellConfig
from .train import CellResult

__all__ = ["Store", "DEFAULT_DB"]

DEFAULT_DB = "normlab-results/results.sqlite"

_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT", bool: "INTEGER"}


def _result_columns() -> dict[str, str]:
    hints = {"str": "TEXT", "float": "REAL", "int": "INTEGER", "float | None": "REAL"}
    return {f.name: hints[str(f.type)] for f in dataclasses.fields(CellResult) if f.name != "curve"}


def _run_columns() -> dict[str, str]:
    cols = {"key": "TEXT PRIMARY KEY"}
    cols.update({k: _SQL_TYPES[t] for k, t in CellConfig.field_types().items()})
    cols.update(_result_columns())
    cols.update({"finished_at": "TEXT", "normlab_version": "TEXT", "host": "TEXT"})
    return cols


class Store:
    """A study database. ``Store(path)`` creates the file, its folder and tables as needed."""

    def __init__(self, path: str | Path, timeout: float = 120.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(str(self.path), timeout=timeout, isolation_level=None)
        self.conn.row_factory = sqlite3.Row
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self._ensure_schema()

    # ---------------------------------------------------------------- schema
    def _ensure_schema(self) -> None:
        cols = _run_columns()
        with self._transaction():
            self.conn.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{k} {t}' for k, t in cols.items())})")
            have = {r["name"] for r in self.conn.execute("PRAGMA table_info(runs)")}
            for k, t in cols.items():  # a newer normlab added config fields: extend old files
                if k not in have:
                    self.conn.execute(f"ALTER TABLE runs ADD COLUMN {k} {t}")
            self.conn.execute(
                "CREATE TABLE IF NOT EXISTS curves (key TEXT NOT NULL REFERENCES runs(key), point INTEGER NOT NULL, "
                "epoch REAL, train_loss REAL, val_metric REAL, PRIMARY KEY (key, point))")

    def _transaction(self) -> "_Tx":
        return _Tx(self.conn)

    # ---------------------------------------------------------------- writes
    def write(self, config: CellConfig, result: CellResult) -> bool:
        """Store one finished run and its curve atomically; False if its key was already there."""
        from .. import __version__

        row: dict[str, Any] = {"key": config.key(), **config.to_dict()}
        row.update({k: getattr(result, k) for k in _result_columns()})
        row.update(finished_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                   normlab_version=__version__, host=socket.gethostname())
        names = ", ".join(row)
        marks = ", ".join("?" for _ in row)
        with self._transaction():
            cur = self.conn.execute(f"INSERT OR IGNORE INTO runs ({names}) VALUES ({marks})", list(row.values()))
            if cur.rowcount != 1:
                return False
            self.conn.executemany(
                "INSERT INTO curves (key, point, epoch, train_loss, val_metric) VALUES (?, ?, ?, ?, ?)",
                [(row["key"], i, e, l, v) for i, (e, l, v) in enumerate(result.curve)])
        return True

    def delete(self, keys: Iterable[str]) -> int:
        """Remove runs (and their curves); returns how many runs went."""
        keys = list(keys)
        with self._transaction():
            n = 0
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = ", ".join("?" for _ in chunk)
                self.conn.execute(f"DELETE FROM curves WHERE key IN ({q})", chunk)
                n += self.conn.execute(f"DELETE FROM runs WHERE key IN ({q})", chunk).rowcount
        return n

    # ----------------------------------------------------------------- reads
    def keys(self) -> set[str]:
        return {r[0] for r in self.conn.execute("SELECT key FROM runs")}

    def rows(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Every stored run as a dict (config fields, results, bookkeeping), or just ``keys``."""
        rows = [dict(r) for r in self.conn.execute("SELECT * FROM runs ORDER BY rowid")]
        if keys is not None:
            wanted = set(keys)
            rows = [r for r in rows if r["key"] in wanted]
        return rows

    def curves(self) -> dict[str, list[tuple[float, float | None, float | None]]]:
        out: dict[str, list[tuple[float, float | None, float | None]]] = {}
        for r in self.conn.execute("SELECT key, epoch, train_loss, val_metric FROM curves ORDER BY key, point"):
            out.setdefault(r[0], []).append((r[1], r[2], r[3]))
        return out

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): takes the write lock up
    front, so two writers queue on the busy timeout instead of failing mid-transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
