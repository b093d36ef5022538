"""The backend interface: cells in, (config, result-or-error) out as each finishes; the
driver alone writes the store; unknown backends are a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest

from normlab.study import Backend, CellConfig, LocalBackend, Store, make_backend, run_cell, run_grid


def _cfg(norm: str, seed: int = 0) -> CellConfig:
    return CellConfig(task="digits", norm=norm, batch_size=8, seed=seed, epochs=1, base_lr=0.1, train_subset=32,
                      width=2)


def test_local_backend_returns_each_cell_once_with_result_or_error() -> None:
    with make_backend("local", workers=1) as backend:
        assert isinstance(backend, Backend) and backend.slots == 1
        good, bad = _cfg("bn"), _cfg("gn:3")  # 3 groups do not divide 2 channels: the cell raises
        backend.submit(good)
        backend.submit(bad)
        done = {d.config: d for d in backend.as_completed()}
    assert set(done) == {good, bad}
    assert done[good].error is None and done[good].result.val_metric == run_cell(good).val_metric
    assert done[bad].result is None and "ValueError" in done[bad].error and "\n" not in done[bad].error


class _Recorder:
    """A backend written against the interface alone: runs cells in-process, records them."""

    slots = 1

    def __init__(self) -> None:
        self.inner, self.seen = LocalBackend(1), []

    def submit(self, config, task=None):
        self.seen.append(config)
        self.inner.submit(config, task)

    def as_completed(self):
        return self.inner.as_completed()

    def running(self):
        return []

    def close(self):
        self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def test_run_grid_takes_any_backend_and_stores_what_it_returns(tmp_path: Path) -> None:
    cells = [_cfg("bn", 0), _cfg("none", 0)]
    rec = _Recorder()
    with Store(tmp_path / "r.sqlite") as store:
        out = run_grid(cells, store, progress=False, backend=rec)
        assert {c for c, _ in out.ran} == set(cells) and store.keys() == {c.key() for c in cells}
        again = run_grid(cells, store, progress=False, backend=rec)  # stored: nothing submitted
    assert sorted(rec.seen, key=str) == sorted(cells, key=str) and again.skipped == 2 and not again.ran


def test_unknown_backend_and_local_address_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="unknown backend 'slurm'; known backends: local"):
        make_backend("slurm")
    with pytest.raises(ValueError, match="takes no address"):
        make_backend("local", address="ray://x:10001")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        make_backend("local", workers=0)


@pytest.mark.slow
def test_local_backend_in_worker_processes_matches_in_process() -> None:
    cells = [_cfg("bn", 0), _cfg("none", 1), _cfg("gn:3", 0)]
    with make_backend("local", workers=2) as backend:
        for c in cells:
            backend.submit(c)
        done = {d.config: d for d in backend.as_completed()}
    assert set(done) == set(cells)
    for c in cells[:2]:
        assert done[c].result.curve == run_cell(c).curve  # the same pure function, another process
    assert "ValueError" in done[cells[2]].error


def test_ray_backend_absent_is_a_clear_error() -> None:
    import importlib.util

    if importlib.util.find_spec("normlab.study.ray_backend") is not None:
        pytest.skip("this installation has a Ray backend")
    with pytest.raises(ValueError, match="backend 'ray' is not available"):
        make_backend("ray", address="auto")
