"""normlab.compare on models and data a user brings: a small ResNet-style CNN with
nn.BatchNorm2d and a residual block, a small MLP with nn.BatchNorm1d, TensorDatasets; end to
end with db and out, resume, fingerprints, the learning-rate check, and every bad input
rejected before any training."""

from __future__ import annotations

from pathlib import Path

import pytest
from _helpers import study_rows as _rows
import torch
from torch import nn
from torch.utils.data import TensorDataset

import normlab
from normlab.study import CellConfig
from normlab.study.compare import ModelTask, data_fingerprint, lr_range_check, model_fingerprint


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


def small_resnet(channels: int = 8) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU(),
                         Residual(channels), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 3))


def small_mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))


def _images(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 1, 6, 6, generator=g) * 0.5
    x[:, 0, :2, :] += (y == 0).float()[:, None, None]  # each class lights its own rows: learnable
    x[:, 0, 2:4, :] += (y == 1).float()[:, None, None]
    x[:, 0, 4:, :] += (y == 2).float()[:, None, None]
    return TensorDataset(x, y)


def _vectors(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(torch.randn(n, 6, generator=g) + 2 * nn.functional.one_hot(y, 6).float(), y)


@pytest.mark.slow
def test_resnet_end_to_end_db_out_resume(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, out = tmp_path / "r.sqlite", tmp_path / "rep"
    train, val = _images(48, 0), _images(30, 1)
    kw = dict(norms=["bn", "gn", "none"], batch_sizes=[8, 16], seeds=3, epochs=1, lr=0.05, db=db, out=out,
              progress=False)
    recs = normlab.compare(small_resnet, train, val, **kw)
    assert len(recs) == 3 * 2 * 3 == len(_rows(db))
    assert {r["norm"] for r in recs} == {"bn", "gn:8", "none"}  # bare gn: the model's group count (8 channels)
    for r in recs:
        assert r["status"] == "ok" and r["train_size"] == 48 and r["val_size"] == 30 and r["metric"] == "error"
        assert r["fingerprint"] and r["key"] == CellConfig.from_row(r).key()
        assert r["lr"] == pytest.approx(0.05 * r["batch_size"] / 32)
    params = {r["norm"]: r["param_count"] for r in recs}
    assert params["bn"] == params["gn:8"] == params["none"] + 3 * 2 * 8  # 3 norms of 8 channels, weight + bias
    report = (out / "report.md").read_text()
    assert "Batch size 8" in report and "30 validation examples: one example is worth 3.33 points" in report
    assert "cost pass after training" in report and not list(tmp_path.glob("report"))
    # the same call again: every run is found, nothing trains
    again = normlab.compare(small_resnet, train, val, **kw)
    assert sorted(r["key"] for r in again) == sorted(r["key"] for r in recs)
    assert [r["finished_at"] for r in sorted(again, key=lambda r: r["key"])] == \
           [r["finished_at"] for r in sorted(recs, key=lambda r: r["key"])]
    # changed data: new keys, the stale rows are not reused
    other = normlab.compare(small_resnet, train, _images(30, 2), **{**kw, "norms": ["bn"], "batch_sizes": [8]})
    assert not {r["key"] for r in other} & {r["key"] for r in recs} and len(_rows(db)) == 18 + 3


def test_mlp_with_batchnorm1d_and_custom_loss_metric(tmp_path: Path) -> None:
    def mae(out: torch.Tensor, y: torch.Tensor) -> float:
        return (out.argmax(1) - y).abs().double().mean().item()

    train, val = _vectors(40, 0), _vectors(20, 1)
    threads, rng = torch.get_num_threads(), torch.random.get_rng_state()
    recs = normlab.compare(small_mlp, train, val, norms=["bn", "lnc", "none"],
                           batch_sizes=[8], seeds=1, epochs=1, lr=0.1, metric=mae, db=tmp_path / "m.sqlite",
                           progress=False)
    assert torch.get_num_threads() == threads and torch.equal(torch.random.get_rng_state(), rng)  # caller's state
    assert {r["norm"] for r in recs} == {"bn", "lnc", "none"} and {r["metric"] for r in recs} == {"mae"}
    assert (tmp_path / "report" / "report.md").is_file()  # next to the database by default
    assert all(r["status"] == "ok" and r["steps"] == 5 for r in recs)


def test_the_same_seed_gives_every_norm_the_same_init_of_shared_layers() -> None:
    task = ModelTask(small_resnet, *_images(8, 0).tensors, *_images(4, 1).tensors)
    convs = []
    for spec in ("bn", "gn:2", "none"):
        torch.manual_seed(3)
        m = task.build_model(spec)
        convs.append([p for n, p in m.named_parameters() if "conv" in n or n.startswith("0.") or "6." in n])
    for other in convs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(convs[0], other))
    from normlab.study import get_task

    for name in ("digits", "transformer"):  # the built-in tasks too: a norm never moves the random stream
        t = get_task(name)
        shared = []
        for spec in ("bn", "none", "lnc"):
            torch.manual_seed(5)
            shared.append({n: p for n, p in t.build_model(spec, 4).named_parameters() if "norm" not in n
                           and not n.startswith("features.1") and not n.startswith("features.4")
                           and not n.startswith("features.7")})
        assert all(torch.equal(shared[0][n], s[n]) for s in shared[1:] for n in shared[0])


def test_fingerprints_see_model_and_data_changes() -> None:
    assert model_fingerprint(small_resnet(8)) == model_fingerprint(small_resnet(8))
    assert model_fingerprint(small_resnet(8)) != model_fingerprint(small_resnet(4))
    a = _images(20, 0).tensors
    assert data_fingerprint(*a) == data_fingerprint(*[t.clone() for t in a])
    b = [t.clone() for t in a]
    b[0][19, 0, 0, 0] += 1  # the last row is in the sample
    assert data_fingerprint(*a) != data_fingerprint(*b)


def test_lr_check_is_deterministic_and_stored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train, val = _vectors(64, 0), _vectors(20, 1)
    task = ModelTask(small_mlp, *train.tensors, *val.tensors)
    fields = dict(epochs=1, base_batch=32, lr_rule="linear", threads=1, fingerprint=task.fingerprint())
    lr1, text1 = lr_range_check(task, "bn", 8, 0, fields)
    lr2, text2 = lr_range_check(task, "bn", 8, 0, fields)
    assert (lr1, text1) == (lr2, text2) and f"Chose base lr {lr1:g}" in text1 and "0.003:" in text1
    recs = normlab.compare(small_mlp, train, val, norms=["bn", "none"], batch_sizes=[8], seeds=1, epochs=1,
                           db=tmp_path / "l.sqlite", progress=True)
    assert {r["base_lr"] for r in recs} == {lr1}
    assert f"Chose base lr {lr1:g}" in capsys.readouterr().err
    assert "learning-rate check on bn at batch 8" in (tmp_path / "report" / "report.md").read_text()


class _Same:
    def __init__(self) -> None:
        self.m = small_mlp()

    def __call__(self) -> nn.Module:
        return self.m


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_fn=lambda: nn.Sequential(nn.Linear(6, 3))), "no normalization layer found"),
    (dict(norms=["gn:8"], model_fn=lambda: nn.Sequential(nn.Conv2d(1, 12, 3), nn.BatchNorm2d(12), nn.Flatten(),
                                                          nn.LazyLinear(3))),
     "norm 'gn:8' cannot be placed at 1 (BatchNorm2d, 12 channels)"),
    (dict(batch_sizes=[8, 64]), "batch size 64 is larger than the training set (40 examples)"),
    (dict(model_fn=_Same()), "returned the same model instance twice"),
    (dict(train=[(torch.zeros(6),)] * 4), "train[0] must be an (input, target) pair, got a tuple of 1 items"),
    (dict(val=[torch.zeros(6)] * 4), "val[0] must be an (input, target) pair, got a Tensor"),
    (dict(train=[([0.0] * 6, 1)] * 4), "train[0][0] (the input) must be a tensor, got list"),
    (dict(norms=["nosuch"]), "unknown norm 'nosuch'"),
    (dict(norms=["in"]), "norm 'in' cannot be placed"),
    (dict(backend="slurm"), "unknown backend 'slurm'"),
    (dict(workers=2, model_fn=lambda: small_mlp()), "needs a model_fn, loss and metric that pickle can send"),
    (dict(lr_rule="cubic"), "lr_rule must be one of"),
])
def test_bad_input_raises_before_training(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kwargs: dict,
                                          message: str) -> None:
    from normlab.study import train as train_mod

    def no_training(*a: object, **k: object) -> None:
        raise AssertionError("trained before checking its input")

    monkeypatch.setattr(train_mod, "run_cell", no_training)
    args = dict(model_fn=small_mlp, train=_vectors(40, 0), val=_vectors(10, 1), norms=["bn"], batch_sizes=[8],
                seeds=1, epochs=1, lr=0.1, db=tmp_path / "x.sqlite", progress=False)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError)) as info:
        normlab.compare(args.pop("model_fn"), args.pop("train"), args.pop("val"), **args)
    assert message in str(info.value)
    assert not (tmp_path / "x.sqlite").exists()  # nothing stored
