"""The store's study-level tables, next to ``runs`` and ``curves``: ``costs`` (the cost pass:
step time and saved bytes per norm and batch size, measured after training) and ``notes``
(per study: the planned grid, the learning-rate check's choice and why), ``failures`` (per
cell: the error of a cell that raised or whose worker kept dying). Keyed by the
study's ``CellConfig.study_key()``. Created by the first write; a database without them
reads as empty (a study stored before they existed)."""

from __future__ import annotations

import datetime
import json
from typing import Any

from .config import CellConfig
from .store import Store

__all__ = ["write_costs", "read_costs", "put_note", "read_notes", "record_failure", "read_failures"]

_COSTS = ("CREATE TABLE IF NOT EXISTS costs (study TEXT NOT NULL, norm TEXT NOT NULL, batch_size INTEGER NOT NULL, "
          "step_s REAL, saved_bytes_per_sample REAL, threads INTEGER, measured_at TEXT, "
          "PRIMARY KEY (study, norm, batch_size))")
_NOTES = ("CREATE TABLE IF NOT EXISTS notes (study TEXT NOT NULL, name TEXT NOT NULL, value TEXT, "
          "PRIMARY KEY (study, name))")

_FAILURES = ("CREATE TABLE IF NOT EXISTS failures (key TEXT PRIMARY KEY, study TEXT, label TEXT, error TEXT, "
             "failed_at TEXT, host TEXT)")


def _has(store: Store, table: str) -> bool:
    return store.conn.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (table,)).fetchone() is not None


def write_costs(store: Store, study: str, costs: dict[tuple[str, int], tuple[float, float]], threads: int) -> None:
    """Store the cost pass of one study: ``(norm, batch size) -> (step seconds, saved bytes
    per sample)``, replacing earlier measurements of the same cells."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    store.open_for_writing()
    with store._errors("store the cost pass in"), store._transaction():
        store.conn.execute(_COSTS)
        store.conn.executemany(
            "INSERT OR REPLACE INTO costs VALUES (?, ?, ?, ?, ?, ?, ?)",
            [(study, n, b, t, s, threads, now) for (n, b), (t, s) in costs.items()])


def read_costs(store: Store) -> dict[str, dict[tuple[str, int], tuple[float, float, int]]]:
    """study -> (norm, batch size) -> (step seconds, saved bytes per sample, threads)."""
    out: dict[str, dict[tuple[str, int], tuple[float, float, int]]] = {}
    if not _has(store, "costs"):
        return out
    for r in store.conn.execute("SELECT study, norm, batch_size, step_s, saved_bytes_per_sample, threads FROM costs"):
        out.setdefault(r[0], {})[(r[1], int(r[2]))] = (float(r[3]), float(r[4]), int(r[5]))
    return out


def put_note(store: Store, study: str, name: str, value: Any) -> None:
    """Store one JSON value under (study, name), replacing an earlier one."""
    store.open_for_writing()
    with store._errors("store a note in"), store._transaction():
        store.conn.execute(_NOTES)
        store.conn.execute("INSERT OR REPLACE INTO notes VALUES (?, ?, ?)", (study, name, json.dumps(value)))


def read_notes(store: Store) -> dict[str, dict[str, Any]]:
    """study -> name -> value; a value that is not valid JSON reads as None."""
    out: dict[str, dict[str, Any]] = {}
    if not _has(store, "notes"):
        return out
    for study, name, value in store.conn.execute("SELECT study, name, value FROM notes"):
        try:
            out.setdefault(str(study), {})[str(name)] = json.loads(value)
        except (TypeError, ValueError):
            out.setdefault(str(study), {})[str(name)] = None
    return out


def record_failure(store: Store, config: CellConfig, error: str) -> None:
    """Store that the cell ``config`` failed, with its error (replacing an earlier failure of
    it). Not a run: the cell stays missing from ``runs``, so the next run of the grid tries it
    again; ``read_failures`` drops it once a run of it is stored."""
    import socket

    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    store.open_for_writing()
    with store._errors("store a failed cell in"), store._transaction():
        store.conn.execute(_FAILURES)
        store.conn.execute("INSERT OR REPLACE INTO failures VALUES (?, ?, ?, ?, ?, ?)",
                           (config.key(), config.study_key(), config.label(), error, now, socket.gethostname()))


def read_failures(store: Store) -> dict[str, dict[str, str]]:
    """cell key -> {"study", "label", "error", "failed_at", "host"} for every failed cell with
    no stored run."""
    if not _has(store, "failures"):
        return {}
    rows = store.conn.execute("SELECT key, study, label, error, failed_at, host FROM failures "
                              "WHERE key NOT IN (SELECT key FROM runs) ORDER BY failed_at")
    return {r[0]: dict(zip(("study", "label", "error", "failed_at", "host"), r[1:])) for r in rows}
