"""The study database: every config field stored, one transaction per run, INSERT OR
IGNORE on the key, --fresh deletes, two processes writing to one file at once."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from normlab.study import CellConfig, CellResult, Store


def _result(i: int, points: int = 3) -> CellResult:
    curve = tuple((float(p), 1.0 / (p + 1), 0.5 / (p + 1)) for p in range(points))
    return CellResult(status="ok", metric="error", val_metric=0.01 * i, final_train_loss=0.1, median_step_s=1e-3,
                      saved_bytes_per_sample=100.0, param_count=10, steps=5, train_size=10, val_size=5, lr=0.1,
                      wall_s=0.5, curve=curve)


def _cfg(i: int) -> CellConfig:
    return CellConfig(task="digits", norm="bn", batch_size=2 + i, seed=i % 3, epochs=1, base_lr=0.1)


def test_roundtrip_every_field_and_duplicate_ignored(tmp_path: Path) -> None:
    db = tmp_path / "sub" / "r.sqlite"
    with Store(db) as s:
        assert s.write(_cfg(0), _result(0))
        assert not s.write(_cfg(0), _result(7))  # same key: the first stays
        assert s.write(_cfg(1), _result(1))
        assert s.keys() == {_cfg(0).key(), _cfg(1).key()}
        rows = {r["key"]: r for r in s.rows()}
        r0 = rows[_cfg(0).key()]
        assert CellConfig.from_row(r0) == _cfg(0)
        assert r0["val_metric"] == 0.0 and r0["status"] == "ok" and r0["finished_at"]
        assert s.curves()[_cfg(0).key()] == list(_result(0).curve)
        assert s.delete([_cfg(0).key()]) == 1
        assert s.keys() == {_cfg(1).key()} and _cfg(0).key() not in s.curves()
    assert db.exists()


def test_old_database_gains_new_config_columns(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    con = sqlite3.connect(db)
    # a file from an older normlab (before the schema marker and some config fields): its two tables
    con.execute("CREATE TABLE runs (key TEXT PRIMARY KEY, task TEXT, norm TEXT, batch_size INTEGER, seed INTEGER)")
    con.execute("CREATE TABLE curves (key TEXT NOT NULL REFERENCES runs(key), point INTEGER NOT NULL, "
                "epoch REAL, train_loss REAL, val_metric REAL, PRIMARY KEY (key, point))")
    con.commit()
    con.close()
    with Store(db) as s:
        assert s.write(_cfg(2), _result(2))
        assert CellConfig.from_row(s.rows()[0]) == _cfg(2)


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    bad = _result(0)
    object.__setattr__(bad, "curve", ((0.0, 1.0, 0.5), (1.0, "not", "a row", "at all")))
    with Store(tmp_path / "r.sqlite") as s:
        try:
            s.write(_cfg(0), bad)
        except Exception:
            pass
        else:
            raise AssertionError("a malformed curve row should fail the write")
        assert s.keys() == set() and s.curves() == {}


WRITER = textwrap.dedent("""
    import pathlib, sys, time
    from normlab.study import CellConfig, CellResult, Store
    db, start = sys.argv[1], int(sys.argv[2])
    folder = pathlib.Path(db).parent
    (folder / f"ready{start}").touch()  # start writing together: wait for the other writer
    while len(list(folder.glob("ready*"))) < 2:
        time.sleep(0.005)
    with Store(db) as s:
        for i in range(start, start + 60):
            cfg = CellConfig(task="digits", norm="gn", batch_size=1 + i, seed=0, epochs=1, base_lr=0.1)
            curve = tuple((float(p), 1.0, 0.5) for p in range(20))
            s.write(cfg, CellResult(status="ok", metric="error", val_metric=0.1, final_train_loss=0.1,
                                    median_step_s=1e-3, saved_bytes_per_sample=1.0, param_count=1, steps=1,
                                    train_size=1, val_size=1, lr=0.1, wall_s=0.1, curve=curve))
""")


@pytest.mark.slow
def test_two_concurrent_writers(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    Store(db).close()
    # two processes, 60 runs each, 30 of them the same cells: no error, no duplicate, nothing lost
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), str(start)], stderr=subprocess.PIPE, text=True)
             for start in (0, 30)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    con = sqlite3.connect(db)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert con.execute("SELECT count(*), count(DISTINCT key) FROM runs").fetchone() == (90, 90)
        assert con.execute("SELECT count(*) FROM curves").fetchone()[0] == 90 * 20
        assert {r[0] for r in con.execute("SELECT batch_size FROM runs")} == set(range(1, 91))
    finally:
        con.close()
