"""Study results in SQLite: one row per finished run, its learning curve in a child table.

A run's row holds every field of its ``CellConfig`` plus its results, keyed by the config's
hash; the row and its curve are written in one transaction when the run ends, so a run
killed at any moment (SIGKILL included) leaves nothing behind and is redone next time. The
database is in WAL mode with a long busy timeout, so several studies may write to one file
at once; a cell finished by two of them is stored once (``INSERT OR IGNORE``).

A normlab study database is marked (``PRAGMA application_id`` and ``user_version``). Any
other file (another program's SQLite database, a damaged file, not a database at all) is
refused with a :class:`StoreError` before anything in it changes (a file of an older normlab,
made before the marker, is recognised by its two tables and marked). ``Store`` opens the file
read-only and switches to writing (creating it, WAL mode) only when asked to write, so a
report never changes the file; :meth:`Store.open_for_writing` checks up front that writing
works. Every database problem is a :class:`StoreError`: one line naming the file and what to do.
"""

from __future__ import annotations

import dataclasses
import datetime
import socket
import sqlite3
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator
from urllib.parse import quote

from .config import CellConfig
from .train import CellResult

__all__ = ["Store", "StoreError", "DEFAULT_DB"]

DEFAULT_DB = "normlab-results/results.sqlite"

_SQL_TYPES = {int: "INTEGER", float: "REAL", str: "TEXT", bool: "INTEGER"}
APPLICATION_ID = 0x6E6C7374  # "nlst": this file is a normlab study database
SCHEMA_VERSION = 1
_CURVE_COLUMNS = ["key", "point", "epoch", "train_loss", "val_metric"]


class StoreError(Exception):
    """A study database that cannot be used; the message names the file and what to do."""


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
    """A study database. ``Store(path)`` checks that an existing file is one (read-only); the
    file, its folder and tables are created on the first write (or :meth:`open_for_writing`).
    ``readonly=True`` never writes."""

    def __init__(self, path: str | Path, timeout: float = 120.0, readonly: bool = False) -> None:
        self.path = Path(path)
        self.timeout = timeout
        self.readonly = readonly
        self.conn: sqlite3.Connection | None = None
        self._writing = False
        if self.path.is_dir():
            raise StoreError(f"{self.path} is a folder, not a study database: pass a file name with --db")
        if self.path.exists():
            with self._errors("open"):
                self.conn = self._connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True)
                self._check_kind()
        elif readonly:
            raise StoreError(f"no study database at {self.path} (run `normlab study --db {self.path}` first)")

    def _connect(self, target: str, uri: bool = False) -> sqlite3.Connection:
        conn = sqlite3.connect(target, timeout=self.timeout, isolation_level=None, uri=uri)
        conn.row_factory = sqlite3.Row
        return conn

    @contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        """Turn SQLite's and the OS's errors into one-line StoreErrors naming the file."""
        try:
            yield
        except sqlite3.Error as exc:
            text = str(exc)
            if "not a database" in text or "malformed" in text:
                hint = "the file is damaged or not an SQLite database: restore it or pass another --db"
            elif "readonly" in text or "read-only" in text or "unable to open" in text:
                hint = "check that the file and its folder are writable by you, or pass another --db"
            elif "full" in text:
                hint = "the disk is full: free some space (runs already stored are kept) and run again"
            elif "locked" in text or "busy" in text:
                hint = "another process holds it locked: wait for it, or pass another --db"
            else:
                hint = "pass another --db"
            raise StoreError(f"cannot {doing} the study database {self.path}: {text}; {hint}") from None
        except OSError as exc:
            raise StoreError(f"cannot {doing} the study database {self.path}: {exc.strerror or exc}; "
                             f"pass another --db") from None

    # ---------------------------------------------------------------- schema
    def _kind(self) -> str:
        """"normlab", "empty" (no tables: a new file), "legacy" (normlab's tables, unmarked) or
        why the file is not a normlab study database."""
        conn = self.conn
        assert conn is not None
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
                  if not r[0].startswith("sqlite_")}
        if app_id == APPLICATION_ID:
            if version > SCHEMA_VERSION:
                return f"it was written by a newer normlab (schema {version}; this one reads up to {SCHEMA_VERSION})"
            return "normlab"
        if app_id != 0:
            return f"it belongs to another program (application_id {app_id:#x})"
        if not tables:
            return "empty"
        curves = [r[1] for r in conn.execute("PRAGMA table_info(curves)")]
        runs = {r[1] for r in conn.execute("PRAGMA table_info(runs)")}
        if tables == {"runs", "curves"} and curves == _CURVE_COLUMNS and {"key", "task", "norm"} <= runs <= set(
                _run_columns()):
            return "legacy"
        return f"it has no normlab marker, and tables {', '.join(sorted(tables))}"

    def _check_kind(self) -> str:
        kind = self._kind()
        if kind not in ("normlab", "empty", "legacy"):
            raise StoreError(f"{self.path} is not a normlab study database ({kind}); nothing in it was changed: "
                             f"pass another --db")
        return kind

    def open_for_writing(self) -> None:
        """Open (creating if needed) the database for writing, marked and in WAL mode, and check
        that a write goes through, so a study learns before training that it could not store
        its results. Refuses a file that is not a normlab study database, changing nothing."""
        if self._writing:
            return
        if self.readonly:
            raise StoreError(f"{self.path} was opened read-only")
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        with self._errors("write to"):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.conn = self._connect(str(self.path))
            self._check_kind()  # before any write: a foreign file stays as it was
            with self._transaction():
                self._check_kind()  # again under the write lock (another process may have just made it)
                self._ensure_schema()
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
        self._writing = True

    def _ensure_schema(self) -> None:
        assert self.conn is not None
        cols = _run_columns()
        self.conn.execute(f"CREATE TABLE IF NOT EXISTS runs ({', '.join(f'{k} {t}' for k, t in cols.items())})")
        have = {r["name"] for r in self.conn.execute("PRAGMA table_info(runs)")}
        for k, t in cols.items():  # a newer normlab added config fields: extend old files
            if k not in have:
                self.conn.execute(f"ALTER TABLE runs ADD COLUMN {k} {t}")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS curves (key TEXT NOT NULL REFERENCES runs(key), point INTEGER NOT NULL, "
            "epoch REAL, train_loss REAL, val_metric REAL, PRIMARY KEY (key, point))")
        self.conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")  # a write even when unchanged: the probe

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
        self.open_for_writing()
        with self._errors("store a run in"), self._transaction():
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
        self.open_for_writing()
        with self._errors("delete runs from"), self._transaction():
            n = 0
            for i in range(0, len(keys), 500):
                chunk = keys[i:i + 500]
                q = ", ".join("?" for _ in chunk)
                self.conn.execute(f"DELETE FROM curves WHERE key IN ({q})", chunk)
                n += self.conn.execute(f"DELETE FROM runs WHERE key IN ({q})", chunk).rowcount
        return n

    # ----------------------------------------------------------------- reads
    def _query(self, sql: str) -> list[sqlite3.Row]:
        """The rows of a query ([] while the file does not exist yet, or has no tables)."""
        if self.conn is None:
            return []
        with self._errors("read"):
            if self.conn.execute("SELECT count(*) FROM sqlite_master WHERE name = 'runs'").fetchone()[0] == 0:
                return []
            return self.conn.execute(sql).fetchall()

    def keys(self) -> set[str]:
        return {r[0] for r in self._query("SELECT key FROM runs")}

    def rows(self, keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Every stored run as a dict (config fields, results, bookkeeping), or just ``keys``.
        A row whose values do not fit its columns (edited or damaged) is a :class:`StoreError`."""
        rows = [dict(r) for r in self._query("SELECT * FROM runs ORDER BY rowid")]
        if keys is not None:
            wanted = set(keys)
            rows = [r for r in rows if r["key"] in wanted]
        for i, row in enumerate(rows):
            problem = _row_problem(row)
            if problem:
                raise StoreError(f"{self.path}: the run {row.get('key')!r} (row {i + 1}) has {problem}; the file "
                                 f"was edited or damaged: delete that row (or pass another --db)")
        return rows

    def curves(self) -> dict[str, list[tuple[float, float | None, float | None]]]:
        out: dict[str, list[tuple[float, float | None, float | None]]] = {}
        for r in self._query("SELECT key, epoch, train_loss, val_metric FROM curves ORDER BY key, point"):
            out.setdefault(r[0], []).append((r[1], r[2], r[3]))
        return out

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def __enter__(self) -> "Store":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _row_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with a stored run's values (None: nothing): a NULL where a value is
    needed, or a value of another type than its column's."""
    required = {f.name for f in dataclasses.fields(CellConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
    required |= {f.name for f in dataclasses.fields(CellResult) if str(f.type) in ("str", "int")}
    kinds = {**CellConfig.field_types(), **{k: {"TEXT": str, "REAL": float, "INTEGER": int}[t]
                                           for k, t in _result_columns().items()}}
    for name, kind in kinds.items():
        value = row.get(name)
        if value is None:
            if name in required:
                return f"no {name} (NULL)"
            continue
        ok = {str: isinstance(value, str), float: isinstance(value, (int, float)),
              bool: value in (0, 1) and not isinstance(value, str)}.get(kind, isinstance(value, int))
        if not ok:
            return f"{name} = {value!r}, expected {'a number' if kind is float else kind.__name__}"
    return None


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error): takes the write lock up
    front, so two writers queue on the busy timeout instead of failing mid-transaction."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")
