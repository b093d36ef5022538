"""The study store and `normlab study` / `normlab report` as a hostile or unlucky user meets
them (issue 18, items 6, 10, 11): a file that is not a normlab study database is refused and
left byte-identical; `report` changes nothing (no WAL switch); `study` learns before training
that it cannot write; every database problem ends in one `normlab CMD: error:` line naming
the file; and a study's workers leave once the study process is killed, even while it is an
unreaped zombie (the caller still reading its pipes)."""

from __future__ import annotations

import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from normlab.cli import main
from normlab.study import CellConfig, CellResult, Store
from normlab.study import runner
from normlab.study.store import APPLICATION_ID, StoreError

TINY = ["--norms", "bn", "--batch-sizes", "4", "--epochs", "1", "--train-subset", "32", "--seeds", "1",
        "--workers", "1", "--width", "4", "-q"]


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _result() -> CellResult:
    return CellResult(status="ok", metric="error", val_metric=0.1, final_train_loss=0.1, median_step_s=1e-3,
                      saved_bytes_per_sample=1.0, param_count=1, steps=1, train_size=1, val_size=1, lr=0.1,
                      wall_s=0.1, curve=((0.0, 1.0, 0.5), (1.0, 0.5, 0.4)))


def _normlab_db(path: Path, n: int = 2) -> Path:
    with Store(path) as s:
        for i in range(n):
            s.write(CellConfig(task="digits", norm="bn", batch_size=2 + i, seed=0, epochs=1, base_lr=0.1), _result())
    return path


@pytest.fixture
def no_training(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*a: object, **k: object) -> None:
        raise AssertionError("a cell trained although the database could not take its result")

    monkeypatch.setattr(runner, "execute_cell", refuse)


def _one_error_line(capsys: pytest.CaptureFixture[str], cmd: str, path: Path) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"normlab {cmd}: error: "), err
    assert str(path) in err, err
    return err


def _sql(path: Path, *statements: str) -> Path:
    """Run SQL on a file directly (as another program, or a hand edit, would)."""
    con = sqlite3.connect(path)
    for statement in statements:
        con.execute(statement)
    con.commit()
    con.close()
    return path


def _foreign(path: Path) -> Path:
    """Another program's SQLite database, with a table called runs."""
    return _sql(path, "CREATE TABLE runs (id INTEGER PRIMARY KEY, name TEXT)", "INSERT INTO runs (name) VALUES ('x')")


def _text_file(path: Path) -> Path:
    path.write_text("not a database at all\n" * 50)
    return path


def _newer_schema(path: Path) -> Path:
    # (DELETE journal: a WAL file read by any reader leaves -wal/-shm beside it)
    return _sql(_normlab_db(path), "PRAGMA user_version = 99", "PRAGMA journal_mode=DELETE")


def _other_app_id(path: Path) -> Path:
    return _sql(path, "PRAGMA application_id = 1234", "CREATE TABLE t (x)")


@pytest.mark.parametrize("cmd", ["study", "report"])
@pytest.mark.parametrize("make,message", [
    (_foreign, "is not a normlab study database (it has no normlab marker, and tables runs); nothing in it was changed"),
    (_text_file, "file is not a database; the file is damaged or not an SQLite database"),
    (_newer_schema, "written by a newer normlab (schema 99"),
    (_other_app_id, "it belongs to another program (application_id 0x4d2)"),
])
def test_a_file_that_is_not_a_study_database_is_refused_unchanged(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                  no_training: None, cmd: str, make, message: str) -> None:
    db = make(tmp_path / "x.sqlite")
    before = _digest(db)
    argv = ["study", *TINY] if cmd == "study" else ["report"]
    assert main([*argv, "--db", str(db), "--out", str(tmp_path / "rep")]) == 2
    err = _one_error_line(capsys, cmd, db)
    assert message in err, err
    assert _digest(db) == before and sorted(p.name for p in tmp_path.iterdir()) == ["x.sqlite"]


@pytest.mark.parametrize("cmd", ["study", "report"])
def test_a_folder_as_database(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_training: None, cmd: str) -> None:
    argv = ["study", *TINY] if cmd == "study" else ["report"]
    assert main([*argv, "--db", str(tmp_path), "--out", str(tmp_path / "rep")]) == 2
    err = _one_error_line(capsys, cmd, tmp_path)
    assert "no study database" in err or "is a folder" in err


def test_a_corrupt_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _sql(_normlab_db(tmp_path / "r.sqlite", n=30), "PRAGMA journal_mode=DELETE")  # all in the main file
    data = bytearray(db.read_bytes())
    page = 4096 if len(data) > 8192 else 1024
    data[page + 8:2 * page] = b"\xa5" * (page - 8)  # the second page's cells: garbage
    db.write_bytes(bytes(data))
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 2
    err = _one_error_line(capsys, "report", db)
    assert "malformed" in err and "restore it or pass another --db" in err, err


def test_report_opens_read_only_and_changes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = _sql(_normlab_db(tmp_path / "r.sqlite"), "PRAGMA journal_mode=DELETE")
    before = _digest(db)
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 0
    assert _digest(db) == before  # the header's journal mode (bytes 18-19) included
    assert not (tmp_path / "r.sqlite-wal").exists()
    con = sqlite3.connect(db)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    con.close()


def _read_only_connect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Writing connections opened read-only: what SQLite does with a file the user cannot
    write (simulated, since root writes through chmod 444)."""
    real = Store._connect

    def connect(self: Store, target: str, uri: bool = False) -> sqlite3.Connection:
        if not uri:
            target, uri = f"file:{target}?mode=ro", True
        return real(self, target, uri)

    monkeypatch.setattr(Store, "_connect", connect)


@pytest.mark.parametrize("real", [True, False])
def test_a_read_only_database_fails_before_training(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, no_training: None,
                                                   real: bool) -> None:
    db = _sql(_normlab_db(tmp_path / "r.sqlite"), "PRAGMA journal_mode=DELETE")
    if real:
        if os.geteuid() == 0:
            pytest.skip("root writes to a mode-444 file")
        db.chmod(0o444)
    else:
        _read_only_connect(monkeypatch)
    before = _digest(db)
    assert main(["study", *TINY, "--db", str(db), "--out", str(tmp_path / "rep")]) == 2
    err = _one_error_line(capsys, "study", db)
    assert "readonly" in err and "writable" in err, err
    assert _digest(db) == before


def test_a_full_disk_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    db = tmp_path / "r.sqlite"
    real = Store.open_for_writing

    class FullDisk:  # SQLite's SQLITE_FULL, as a full disk gives it on the insert
        def __init__(self, conn: sqlite3.Connection) -> None:
            self.conn = conn

        def execute(self, sql: str, *args: object) -> object:
            if sql.startswith("INSERT"):
                raise sqlite3.OperationalError("database or disk is full")
            return self.conn.execute(sql, *args)

        def __getattr__(self, name: str) -> object:
            return getattr(self.conn, name)

    def full(self: Store) -> None:
        real(self)
        if not isinstance(self.conn, FullDisk):
            self.conn = FullDisk(self.conn)  # type: ignore[assignment]

    monkeypatch.setattr(Store, "open_for_writing", full)
    assert main(["study", *TINY, "--db", str(db), "--out", str(tmp_path / "rep")]) == 2
    err = _one_error_line(capsys, "study", db)
    assert "database or disk is full; the disk is full: free some space" in err, err


@pytest.mark.parametrize("column,value,message", [("norm", None, "has no norm (NULL)"),
                                                  ("batch_size", "eight", "batch_size = 'eight', expected int"),
                                                  ("val_metric", "low", "val_metric = 'low', expected a number")])
def test_odd_rows_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], column: str, value: object,
                               message: str) -> None:
    db = _normlab_db(tmp_path / "r.sqlite")
    con = sqlite3.connect(db)
    con.execute(f"UPDATE runs SET {column} = ? WHERE rowid = 2", (value,))  # (a value: not through _sql)
    con.commit()
    con.close()
    assert main(["report", "--db", str(db), "--out", str(tmp_path / "rep")]) == 2
    err = _one_error_line(capsys, "report", db)
    assert message in err and "(row 2)" in err and "delete that row" in err, err


def test_the_store_refuses_before_any_change_even_on_write(tmp_path: Path) -> None:
    db = _foreign(tmp_path / "x.sqlite")
    before = _digest(db)
    with pytest.raises(StoreError, match="not a normlab study database"):
        Store(db)
    assert _digest(db) == before
    fresh = _normlab_db(tmp_path / "new.sqlite")
    con = sqlite3.connect(fresh)
    assert con.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    con.close()


# ------------------------------------------------------------ workers outlive no study
def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads the process tree from /proc")
def test_workers_exit_when_the_study_is_killed_and_left_unreaped(tmp_path: Path) -> None:
    """The pattern Python's documentation recommends: Popen with pipes, kill(), communicate().
    The study is a zombie until communicate() returns, which needs every worker (holding the
    pipes) gone: the workers must notice their parent's death without it being reaped."""
    argv = [sys.executable, "-m", "normlab.cli", "study", "--norms", "bn,none", "--batch-sizes", "2,4",
            "--seeds", "1", "--epochs", "50", "--train-subset", "256", "--width", "4", "--workers", "2", "-q",
            "--db", str(tmp_path / "r.sqlite"), "--out", str(tmp_path / "rep")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    workers: set[int] = set()
    while time.time() < deadline and proc.poll() is None and len(workers) < 3:  # forkserver + 2 workers
        time.sleep(0.2)
        workers = _descendants(proc.pid)
    assert proc.poll() is None and len(workers) >= 3, "the workers never started"
    time.sleep(1.0)  # let them take their cells
    proc.kill()
    t0 = time.time()
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        for pid in workers:  # clean up after the failure
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.communicate()
        pytest.fail("the workers outlived the killed study: communicate() hung")
    assert time.time() - t0 < 10, time.time() - t0
    while time.time() < t0 + 20 and _alive(workers):  # (the resource tracker may take a moment)
        time.sleep(0.2)
    assert not _alive(workers), [_cmdline(pid) for pid in _alive(workers)]


def _alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if _state(pid) not in ("Z", "gone")}


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return "gone"


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return "gone"
