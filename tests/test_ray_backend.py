"""The Ray backend: cells as Ray tasks on a local 2-CPU Ray (one instance shared by the
module), the driver the only writer of the store; a killed driver resumes with every cell
stored once; failing cells (raising, or their worker dying every time) are recorded with
their error; a dead worker is retried. Skipped when Ray is not installed; the missing-Ray
error itself is tested by hiding the module."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

from normlab.study import CellConfig, Store, make_backend, run_cell, run_grid
from normlab.study.tables import read_failures
from normlab.study.tasks import Digits

SRC = str(Path(__file__).resolve().parents[1] / "src")


def _cfg(norm: str, seed: int = 0, task: str = "digits", epochs: int = 1, subset: int = 32) -> CellConfig:
    return CellConfig(task=task, norm=norm, batch_size=8, seed=seed, epochs=epochs, base_lr=0.1,
                      train_subset=subset, width=2)


@pytest.fixture(scope="module")
def ray_address():
    """One local Ray with 2 CPUs for the module (the backend uses this connection and leaves it open)."""
    ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install 'normlab[ray]'")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # this file's tasks, shipped to workers
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
        ray.shutdown()


def test_missing_ray_is_a_clear_error_at_once(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from normlab.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the extra
    with pytest.raises(ImportError, match=r"backend 'ray' needs Ray.*pip install 'normlab\[ray\]'"):
        make_backend("ray")
    t0 = time.perf_counter()
    rc = main(["study", "--task", "digits", "--norms", "bn", "--backend", "ray", "--db", "/nonexistent/x.sqlite"])
    assert rc == 2 and "pip install 'normlab[ray]'" in capsys.readouterr().err
    assert time.perf_counter() - t0 < 10  # before any training or database


def test_progress_line_counts_done_running_and_queued() -> None:
    import io

    from normlab.study.runner import Progress

    stream = io.StringIO()
    bar = Progress(total_cost=10.0, n=5, stream=stream)
    bar.update([_cfg("bn", 1), _cfg("none", 1)], finished=_cfg("bn", 0), cost=2.0)
    line = stream.getvalue()
    assert "1/5 digits bn bs=8 seed=0" in line and "2 running, 2 queued" in line
    assert re.search(r"ETA \d+:\d\d$", line.strip())


def test_cli_hands_backend_address_and_cpus_per_cell_to_make_backend(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture) -> None:
    from normlab.cli import main
    from normlab.study import backends

    seen = {}

    def fake(name, **kw):
        seen.update(name=name, **kw)
        raise ValueError("stop here")

    monkeypatch.setattr(backends, "make_backend", fake)
    argv = ["study", "--task", "digits", "--norms", "bn", "--batch-sizes", "8", "--seeds", "1", "--nproc", "2",
            "--backend", "ray", "--address", "ray://127.0.0.1:10001", "--cpus-per-cell", "2", "--db", "/nonexistent/x"]
    assert main(argv) == 2 and "stop here" in capsys.readouterr().err
    seen.pop("workers")  # the local process count (the machine's cores): not the Ray backend's business
    assert seen == {"name": "ray", "address": "ray://127.0.0.1:10001", "cpus_per_cell": 2.0}
    rc = main(["study", "--task", "digits", "--norms", "bn", "--cpus-per-cell", "2", "--db", "/nonexistent/x"])
    assert rc == 2 and "--cpus-per-cell applies to --backend ray" in capsys.readouterr().err


def test_four_cell_grid_rows_equal_in_process_runs(ray_address: str, tmp_path: Path) -> None:
    cells = [_cfg(n, s) for n in ("bn", "none") for s in (0, 1)]
    with Store(tmp_path / "r.sqlite") as store, make_backend("ray") as backend:
        assert backend.slots == 2 and backend.cpus_for(cells[0]) == 1
        out = run_grid(cells, store, progress=False, backend=backend)
        rows = {r["key"]: r for r in store.rows()}
        curves = store.curves()
        again = run_grid(cells, store, progress=False, backend=backend)  # all stored: nothing submitted
    assert not out.failed and len(out.ran) == 4 and set(rows) == {c.key() for c in cells}
    assert again.skipped == 4 and not again.ran
    for c in cells:  # the same pure function, run in this process: the same numbers
        ref = run_cell(c)
        assert rows[c.key()]["val_metric"] == ref.val_metric and rows[c.key()]["steps"] == ref.steps
        assert curves[c.key()] == [tuple(p) for p in ref.curve]


def test_failing_cell_is_recorded_with_its_error_and_the_grid_goes_on(ray_address: str, tmp_path: Path) -> None:
    good, bad = _cfg("bn"), _cfg("gn:3")  # 3 groups do not divide 2 channels: the cell raises (on the worker)
    with Store(tmp_path / "r.sqlite") as store, make_backend("ray") as backend:
        out = run_grid([good, bad], store, progress=False, backend=backend)
        assert store.keys() == {good.key()}
        failures = read_failures(store)
    assert [c for c, _ in out.failed] == [bad] and "\n" not in out.failed[0][1]
    assert out.failed[0][1].startswith("ValueError: GroupNorm(2): num_groups must be a positive divisor")
    assert set(failures) == {bad.key()} and failures[bad.key()]["error"] == out.failed[0][1]
    assert failures[bad.key()]["label"] == bad.label()


def test_a_cell_larger_than_the_cluster_fails_at_once(ray_address: str) -> None:
    with make_backend("ray", cpus_per_cell=3) as backend:  # 3 CPUs a cell on a 2-CPU Ray
        backend.submit(_cfg("bn"))
        done = list(backend.as_completed())
    assert [d.error for d in done] == [
        "ValueError: the cell needs 3 CPUs (nproc x cpus_per_cell), the Ray cluster has 2"]


class DyingDigits(Digits):
    """Digits whose model building kills the worker process: ``deaths[norm]`` times in all for
    a cell of that norm (counted in files under ``folder``/norm, seen by every worker)."""

    name = "dying-digits"

    def __init__(self, folder: str, deaths: dict[str, int] | None = None) -> None:
        self.folder, self.deaths = folder, deaths or {}

    def split(self, seed, val_fraction, val_max, train_subset, data_dir=""):  # not found by name: no cache
        return self._split(seed, val_fraction, val_max, train_subset, data_dir)

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        folder = Path(self.folder, norm_spec)
        folder.mkdir(exist_ok=True)
        died = len(os.listdir(folder))
        if died < self.deaths.get(norm_spec, 0):
            Path(folder, f"death{died}").touch()
            os._exit(1)  # as a worker killed by the OOM killer or a lost machine
        return super().build_model(norm_spec, width)


def test_a_task_object_goes_to_the_object_store_once(ray_address: str, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(type(value).__name__) or real_put(value, **kw))
    task = DyingDigits(str(tmp_path))  # never dies: a Task object like normlab.compare's
    cells = [_cfg(n, s, task="dying-digits") for n in ("bn", "none") for s in (0, 1)]
    with Store(tmp_path / "r.sqlite") as store, make_backend("ray") as backend:
        out = run_grid(cells, store, progress=False, backend=backend, task=task)
    assert len(out.ran) == 4 and puts == ["DyingDigits"]


def test_dead_worker_is_retried_and_a_cell_that_keeps_dying_is_recorded(ray_address: str, tmp_path: Path) -> None:
    once, always = _cfg("bn", task="dying-digits"), _cfg("none", task="dying-digits")  # the worker dies 1 / 99 times
    task = DyingDigits(str(tmp_path), {"bn": 1, "none": 99})
    with Store(tmp_path / "r.sqlite") as store, make_backend("ray", max_retries=1) as backend:
        out = run_grid([once, always], store, progress=False, backend=backend, task=task)
        assert store.keys() == {once.key()} and set(read_failures(store)) == {always.key()}
        stored = store.rows()[0]
    assert len(os.listdir(tmp_path / "bn")) == 1  # died once, ran again, stored
    assert stored["val_metric"] == run_cell(once, DyingDigits(str(tmp_path))).val_metric
    assert len(os.listdir(tmp_path / "none")) == 2  # the first try and one retry, then given up
    assert [c for c, _ in out.failed] == [always]
    assert "(after 1 retries)" in out.failed[0][1] and "\n" not in out.failed[0][1]


_DRIVER = """
import sys
from normlab.study import Store, build_grid, make_backend, run_grid

db, address = sys.argv[1:]
cells = build_grid("digits", ["bn", "none"], [8], [0, 1], epochs=3, base_lr=0.1, train_subset=256, width=4)
with Store(db) as store, make_backend("ray", address=address) as backend:
    out = run_grid(cells, store, progress=False, backend=backend)
print(f"{out.total} cells: {len(out.ran)} run, {out.skipped} already stored, {len(out.failed)} failed")
"""


def _study(db: Path, address: str) -> list[str]:
    """A study driver joining the module's Ray (``--address``) as a new job."""
    return [sys.executable, "-c", _DRIVER, str(db), address]


def _stored(db: Path) -> int:
    try:
        with sqlite3.connect(db, timeout=30) as conn:
            return conn.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


@pytest.mark.slow
def test_driver_killed_mid_grid_then_rerun_stores_every_cell_once(ray_address: str, tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen(_study(db, ray_address), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while _stored(db) == 0 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.wait()
    kept = _stored(db)
    assert 1 <= kept < 4, f"the driver was to be killed mid-grid; {kept} of 4 stored ({first.stderr.read()!r})"
    second = subprocess.run(_study(db, ray_address), env=env, capture_output=True, text=True, timeout=180)
    assert second.returncode == 0, second.stderr
    assert f"4 cells: {4 - kept} run, {kept} already stored, 0 failed" in second.stdout
    with sqlite3.connect(db) as conn:
        keys = [r[0] for r in conn.execute("SELECT key FROM runs")]
        norms = sorted(r[0] for r in conn.execute("SELECT norm FROM runs"))
    assert len(keys) == len(set(keys)) == 4 and norms == ["bn", "bn", "none", "none"]


@pytest.mark.slow
def test_reproduce_runs_claims_on_ray_with_the_local_values(ray_address: str, tmp_path: Path) -> None:
    """``normlab reproduce --backend ray``: the claim's cells run as Ray tasks, and its per-seed
    values (hence d, se and the verdict) equal those of the same cells run locally."""
    import json

    from normlab.cli import main

    common = ["reproduce", "--claims", "input-scaling", "--quick", "--seeds", "2", "-q"]
    results = {}
    for backend in ("ray", "local"):
        out = tmp_path / backend
        assert main(common + ["--backend", backend, "--db", str(tmp_path / f"{backend}.sqlite"), "--out", str(out)]) == 0
        results[backend] = json.loads((out / "reproduce.json").read_text())["claims"]
    ray_claims, local_claims = results["ray"], results["local"]
    assert [c["id"] for c in ray_claims] == [c["id"] for c in local_claims] == ["input-scaling"]
    for a, b in zip(ray_claims, local_claims):
        assert a["arms"] == b["arms"] and len(next(iter(a["arms"].values()))) == 2
        assert (a["d"], a["se"], a["verdict"]) == (b["d"], b["se"], b["verdict"])
