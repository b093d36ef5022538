"""`normlab study` / `normlab report` end to end through the CLI, resume after SIGKILL,
--fresh, errors, and the pieces: cell purity, divergence, saved-bytes accounting,
recommendations and the Pareto front."""

from __future__ import annotations

import os
import pickle
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from _helpers import study_rows as _rows
import torch
from torch import nn

from normlab.cli import main
from normlab.registry import describe_norms
from normlab.study import CellConfig, get_task, run_cell
from normlab.study.plots import pareto_front
from normlab.study.train import saved_bytes_per_sample

TINY = ["--task", "digits", "--epochs", "1", "--train-subset", "32", "--seeds", "1", "--workers", "1", "--width", "4",
        "-q"]


def _curve_counts(db: Path) -> dict[str, int]:
    con = sqlite3.connect(db)
    try:
        return dict(con.execute("SELECT key, count(*) FROM curves GROUP BY key").fetchall())
    finally:
        con.close()


@pytest.mark.slow
def test_cli_end_to_end_rows_report_resume_fresh(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, out = tmp_path / "r.sqlite", tmp_path / "rep"
    args = ["study", "--norms", "bn,none", "--batch-sizes", "4,8", "--db", str(db), "--out", str(out), *TINY]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "4 cells: 4 run, 0 already stored, 0 failed" in text
    table = text.split("\n\n")[0]
    assert "bs 4" in table and "bs 8" in table and "\nbn " in table and "\nnone " in table

    rows = _rows(db)
    assert len(rows) == 4
    assert {(r["norm"], r["batch_size"]) for r in rows} == {("bn", 4), ("bn", 8), ("none", 4), ("none", 8)}
    for r in rows:
        cfg = CellConfig.from_row(r)  # every config field is stored, and the key is its hash
        assert cfg.key() == r["key"]
        assert set(CellConfig.field_types()) <= set(r)
        assert r["status"] == "ok" and 0 <= r["val_metric"] <= 1
        assert r["train_size"] == 32 and r["steps"] == 32 // r["batch_size"]
        assert r["lr"] == pytest.approx(0.1 * r["batch_size"] / 32)
        assert r["median_step_s"] > 0 and r["saved_bytes_per_sample"] > 0 and r["param_count"] > 0
    bn_params = {r["param_count"] for r in rows if r["norm"] == "bn"}
    none_params = {r["param_count"] for r in rows if r["norm"] == "none"}
    assert bn_params.pop() - none_params.pop() == 2 * (4 + 8 + 8)  # weight and bias per channel of 3 norms
    counts = _curve_counts(db)
    assert all(counts[r["key"]] == 1 + min(4, r["steps"]) for r in rows)  # step 0 + 4 points in the epoch

    report = (out / "report.md").read_text()
    assert "Recommendation" in report and "Batch size 4" in report and "Batch size 8" in report
    assert "intervals cannot be estimated" in report  # one seed: says so plainly
    for name in ("digits_error_vs_batch.png", "digits_error_vs_time.png", "digits_curves.png",
                 "digits_diff_to_best.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in report

    # the same command again: nothing to run
    assert main(args) == 0
    assert "4 cells: 0 run, 4 already stored" in capsys.readouterr().out
    assert len(_rows(db)) == 4

    # the report from the database alone
    out2 = tmp_path / "rep2"
    assert main(["report", "--db", str(db), "--out", str(out2)]) == 0
    assert (out2 / "report.md").read_text().replace("rep2", "rep") == report.replace("rep2", "rep")

    # --fresh forgets this grid's runs and redoes them
    before = {r["key"]: r["finished_at"] for r in _rows(db)}
    assert main(args + ["--fresh"]) == 0
    assert "4 cells: 4 run, 0 already stored" in capsys.readouterr().out
    assert set(before) == {r["key"] for r in _rows(db)}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--task", "cifar"], "unknown task 'cifar'"),
        (["--norms", "bn,nosuch"], "unknown norm 'nosuch'"),
        (["--task", "sunspots", "--norms", "gn"], "unknown norm 'gn' for task 'sunspots'"),
        (["--batch-sizes", "16,64", "--train-subset", "40"], "batch size 64 is larger than the training set"),
        (["--task", "fashion-mnist", "--data-dir", "EMPTY"], "apt-get install dataset-fashion-mnist"),
        (["--task", "no_such_module_x:make"], "cannot import 'no_such_module_x'"),
        (["--task", "os:getcwd"], "getcwd() returned str, not a normlab.study.Task"),
        (["--task", "digits", "--backend", "slurm"], "unknown backend 'slurm'"),
    ],
)
def test_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    db = tmp_path / "r.sqlite"
    argv = [str(tmp_path) if a == "EMPTY" else a for a in argv]
    base = ["study", "--db", str(db), "--out", str(tmp_path / "rep"), "--epochs", "1", "--seeds", "1", "-q"]
    assert main(base + argv) == 2
    err = capsys.readouterr().err
    assert message in err and "normlab study: error:" in err
    assert not db.exists()  # nothing ran, nothing stored


def test_report_without_database(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--db", str(tmp_path / "missing.sqlite"), "--out", str(tmp_path)]) == 2
    assert "no study database" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_after_sigkill(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    argv = [sys.executable, "-m", "normlab.cli", "study", "--norms", "bn,none", "--batch-sizes", "2,4,8",
            "--seeds", "2", "--epochs", "2", "--train-subset", "96", "--width", "4", "--workers", "1", "-q",
            "--db", str(db), "--out", str(tmp_path / "rep")]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline and proc.poll() is None:
        if db.exists():
            try:
                n = len(_rows(db))
            except sqlite3.OperationalError:
                n = 0
            if n >= 2:
                break
        time.sleep(0.02)
    assert proc.poll() is None, "the study finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rows = _rows(db)
    assert 2 <= len(rows) < 12
    counts = _curve_counts(db)
    assert set(counts) == {r["key"] for r in rows}  # no curve without its run, no run without its curve
    assert all(counts[r["key"]] == 1 + 4 * r["epochs"] for r in rows)

    done = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"12 cells: {12 - len(rows)} run, {len(rows)} already stored" in done.stdout
    keys = [r["key"] for r in _rows(db)]
    assert len(keys) == 12 == len(set(keys))
    assert {(r["norm"], r["batch_size"], r["seed"]) for r in _rows(db)} == {
        (n, b, s) for n in ("bn", "none") for b in (2, 4, 8) for s in (0, 1)}


# ---------------------------------------------------------------- the pieces
def test_default_norms_are_the_registered_conv_norms() -> None:
    task = get_task("digits")
    want = {e.name for e in describe_norms() if "conv" in e.applies_to}
    assert {s.split(":")[0] for s in task.default_norms()} == want
    assert "gn:4" in task.default_norms()  # a group count that divides the model's widths


def test_cell_is_pure_deterministic_and_picklable() -> None:
    cfg = CellConfig(task="digits", norm="gn:2", batch_size=8, seed=3, epochs=1, base_lr=0.1, train_subset=64, width=4)
    assert pickle.loads(pickle.dumps(cfg)) == cfg and hash(cfg) == hash(pickle.loads(pickle.dumps(cfg)))
    a, b = run_cell(cfg), run_cell(cfg)
    assert a.val_metric == b.val_metric and a.curve == b.curve and a.final_train_loss == b.final_train_loss
    assert pickle.loads(pickle.dumps(a)).curve == a.curve
    other = run_cell(CellConfig(**{**cfg.to_dict(), "seed": 4}))
    assert other.curve != a.curve  # the seed moves the split, the init and the order
    assert cfg.key() != CellConfig(**{**cfg.to_dict(), "sync": True}).key()


class _BlowUp(nn.Module):
    """A norm slot whose fourth training call returns NaN: a run that diverges."""

    def __init__(self, num_features: int, **kw: object) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += self.training
        return x * float("nan") if self.calls >= 4 else x  # each slot counts its own calls: the 4th step


def test_divergence_is_recorded_not_raised(monkeypatch: pytest.MonkeyPatch) -> None:
    from normlab import registry

    entry = registry.NormEntry("blowup", _BlowUp, "test", "none", "none")
    monkeypatch.setitem(registry._REGISTRY, "blowup", entry)
    cfg = CellConfig(task="digits", norm="blowup", batch_size=8, seed=0, epochs=2, base_lr=0.1, train_subset=64, width=4)
    r = run_cell(cfg)
    assert r.status == "diverged" and r.val_metric is None and r.final_train_loss is None
    assert r.steps == 4 and r.curve[0][0] == 0.0 and r.curve[0][2] is not None


def test_saved_bytes_counts_each_storage_once_and_skips_parameters() -> None:
    # Linear saves its input (4 floats per sample) and its weight (a parameter: not counted);
    # ReLU saves its output (8 floats); mul saves both operands, two views of one storage (16 floats)
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.lin(x))
            return h[:, :8] * h[:, 8:]

    got = saved_bytes_per_sample(M(), lambda out, y: out.sum(), torch.randn(5, 4), torch.zeros(5))
    assert got == (4 + 16) * 4


def test_pareto_front() -> None:
    pts = [(1.0, 5.0), (2.0, 3.0), (3.0, 4.0), (4.0, 1.0), (2.0, 3.0 + 1e-9)]
    assert pareto_front(pts) == [0, 1, 3]


# -------------------------------------------------------------------- the tasks
def _write_idx(path: Path, arr: "np.ndarray") -> None:
    import gzip
    import struct

    header = struct.pack(">HBB", 0, 0x08, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype("uint8").tobytes())


def test_fashion_mnist_reads_idx_files_from_data_dir(tmp_path: Path) -> None:
    import numpy as np

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=50, dtype=np.uint8)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    task = get_task("fashion-mnist")
    split = task.split(5, 0.2, 2000, 0, str(tmp_path))
    assert split.x_train.shape == (40, 1, 28, 28) and split.x_val.shape == (10, 1, 28, 28)
    # every example is an image of the file with its own label, pixels mapped 0..255 -> -1..1
    x = torch.cat([split.x_train, split.x_val]).numpy()
    y = torch.cat([split.y_train, split.y_val]).numpy()
    flat = {im.tobytes(): lab for im, lab in zip(images, labels)}
    for xi, yi in zip(x, y):
        raw = np.rint((xi[0] + 1) / 2 * 255).astype(np.uint8)
        assert flat[raw.tobytes()] == yi
    cfg = CellConfig(task="fashion-mnist", norm="gn:2", batch_size=8, seed=5, epochs=1, base_lr=0.1, width=2,
                     data_dir=str(tmp_path))
    r = run_cell(cfg)
    assert r.status == "ok" and r.train_size == 40 and r.val_size == 10 and r.steps == 5


def test_sunspots_standardizer_fit_on_training_span_and_rmse_in_original_units() -> None:
    import numpy as np
    from statsmodels.datasets import sunspots

    raw = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float64)
    task = get_task("sunspots")
    split = task.split(0, 0.2, 2000, 0, "")
    n_train = len(raw) - round(0.2 * len(raw))
    L = task.window
    assert split.x_train.shape == (n_train - L, L, 1) and split.x_val.shape == (len(raw) - n_train, L, 1)
    mu, sd = raw[:n_train].mean(), raw[:n_train].std()  # the training span alone, population std
    torch.testing.assert_close(split.y_val[:, 0].double(), torch.from_numpy((raw[n_train:] - mu) / sd),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(split.x_train[0, :, 0].double(), torch.from_numpy((raw[:L] - mu) / sd),
                               rtol=1e-5, atol=1e-5)
    pred = split.y_val + 0.5  # half a training std off everywhere: RMSE = sd / 2 in original units
    assert task.score(pred, split.y_val, split) == pytest.approx(sd / 2, rel=1e-4)


@pytest.mark.slow
def test_sunspots_cells_for_each_slot() -> None:
    specs = get_task("sunspots").default_norms()
    assert {"ln", "bn", "none"} <= set(specs)
    for spec in specs:
        cfg = CellConfig(task="sunspots", norm=spec, batch_size=8, seed=0, epochs=1, base_lr=0.05, width=2,
                         train_subset=32)
        r = run_cell(cfg)
        assert r.status == "ok" and r.metric == "rmse" and r.val_metric > 0 and r.steps == 4


@pytest.mark.slow
def test_mnist1d_generated_locally_and_a_cell_runs() -> None:
    task = get_task("mnist1d")
    split = task.split(0, 0.2, 2000, 0, "")
    assert split.x_train.shape == (4000, 1, 40) and split.x_val.shape == (1000, 1, 40)
    assert set(split.y_train.unique().tolist()) == set(range(10))
    cfg = CellConfig(task="mnist1d", norm="bn", batch_size=16, seed=0, epochs=1, base_lr=0.1, width=4,
                     train_subset=64)
    r = run_cell(cfg)
    assert r.status == "ok" and r.steps == 4 and r.val_size == 1000


# ------------------------------------------------------- a user's task, the transformer
def test_cli_task_module_factory_from_the_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    examples = Path(__file__).resolve().parents[1] / "examples"
    monkeypatch.chdir(examples)  # `normlab study --task custom_task:make_task` run from examples/
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(examples))])
    db = tmp_path / "w" / "r.sqlite"
    argv = ["study", "--task", "custom_task:make_task", "--norms", "bn,lnc,none", "--batch-sizes", "8,16",
            "--seeds", "3", "--epochs", "1", "--workers", "1", "-q", "--db", str(db)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "18 cells: 18 run" in text and "custom_task:make_task: 1 epoch" in text
    rows = _rows(db)
    assert {r["task"] for r in rows} == {"custom_task:make_task"} and len(rows) == 18
    assert {r["val_size"] for r in rows} == {36} and {r["train_size"] for r in rows} == {142}  # wine: 178 rows
    bn = next(r for r in rows if r["norm"] == "bn")
    assert bn["param_count"] == (13 * 64 + 64) + (64 * 64 + 64) + (64 * 3 + 3) + 2 * 2 * 64
    report = db.parent / "report"  # next to the database
    assert (report / "report.md").is_file() and (report / "custom_task_make_task_curves.png").is_file()
    # an example test of the task itself: the split is standardized on the training rows alone
    task = get_task("custom_task:make_task")
    split = task.split(0, 0.2, 2000, 0, "")
    torch.testing.assert_close(split.x_train.mean(0), torch.zeros(13), atol=1e-5, rtol=0)
    assert split.x_val.mean(0).abs().max() > 1e-3


def test_transformer_task_norm_slots_and_a_cell() -> None:
    task = get_task("transformer")
    specs = task.default_norms()
    assert {"lnc", "rmsc", "bn", "none"} <= set(specs)
    assert set(specs) == {e.name for e in describe_norms() if "seq" in e.applies_to}  # the registry decides
    x = task.split(0, 0.2, 2000, 0, "").x_train[:4]
    assert x.shape == (4, 8, 8)  # 8 tokens (image rows) of 8 pixels
    m = task.build_model("bn", 4)
    slots = [mod for name, mod in m.named_modules() if name.endswith(("norm1", "norm2")) or name == "norm"]
    assert len(slots) == 5 and all(getattr(s, "channel_dim", None) == -1 for s in slots)
    ref = nn.LayerNorm(8)  # lnc on (N, tokens, d) is torch's LayerNorm over d
    lnc = task.build_model("lnc", 4).norm
    h = torch.randn(3, 8, 8)
    torch.testing.assert_close(lnc(h), ref(h))
    r = run_cell(CellConfig(task="transformer", norm="rmsc", batch_size=16, seed=0, epochs=1, base_lr=0.05,
                            train_subset=64, width=4))
    assert r.status == "ok" and r.steps == 4 and r.val_size == 359


def test_bare_gn_takes_the_task_group_count(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from normlab.study import resolve_norms

    specs, _ = resolve_norms(get_task("digits"), ["bn", "gn", "gn:2"], 16)
    assert specs == ["bn", "gn:4", "gn:2"]
    with pytest.raises(ValueError, match="norm 'gn:3' for task 'digits'"):
        resolve_norms(get_task("digits"), ["gn:3"], 16)  # an explicit count is kept (and must divide)


def test_version_and_bare_command(capsys: pytest.CaptureFixture[str]) -> None:
    import normlab

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out.strip() == f"normlab {normlab.__version__}"
    with pytest.raises(SystemExit):
        main([])
    err = capsys.readouterr().err
    assert "study" in err and "report" in err and "bench" in err and "--version" in err  # the whole help
