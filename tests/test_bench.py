"""``normlab bench``: argument validation (clear message, exit code 2, no traceback), the
whole-model and small-input modes, the legend and the loaded-machine warning."""

from __future__ import annotations

import json

import pytest
import torch

from normlab.bench_cli import LOADED_SPREAD, loaded_warning
from normlab.bench_models import build_model
from normlab.cli import main


@pytest.mark.parametrize("argv,message", [
    (["--norms", "bn,foo"], "unknown norm 'foo'"),
    (["--shape", "3"], "--shape needs a batch and a channel axis"),
    (["--shape", "2,x,3"], "--shape must be comma-separated positive integers"),
    (["--shape", "2,0,3"], "--shape must be comma-separated positive integers"),
    (["--dtype", "int8"], "--dtype must be one of"),
    (["--channels-last", "--shape", "2,3"], "--channels-last needs a 4-d or 5-d"),
    (["--model", "cnn"], "unknown --model cnn"),
    (["--model", "mlp", "--dtype", "float16"], "--model runs float32 or bfloat16"),
    (["--model", "mlp", "--batch-size", "8,-1"], "--batch-size must be"),
    (["--threads", "0"], "--threads must be a positive integer"),
])
def test_bad_arguments_exit_2_with_a_clear_message(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_layer_table_has_a_legend_and_spreads(tmp_path, capsys):
    out = tmp_path / "b.json"
    assert main(["bench", "--shape", "2,4,3,3", "--norms", "bn", "--quick", "--threads", "1", "--dtype", "bfloat16",
                 "--json", str(out)]) == 0
    captured = capsys.readouterr()
    assert "columns: fwd ms" in captured.out and "bench: round 3/3" in captured.err
    data = json.loads(out.read_text())
    assert data["dtype"] == "bfloat16" and data["copy_spread"] >= 0 and data["baseline_spread"] >= 0


def test_loaded_warning_names_the_baseline():
    assert loaded_warning({"copy": 0.1}) is None
    w = loaded_warning({"copy": 0.1, "torch BatchNorm": LOADED_SPREAD + 0.2})
    assert w is not None and "torch BatchNorm 50%" in w and "copy" not in w.split("(")[1].split(";")[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_mode_times_both_models(dtype, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["bench", "--model", "mlp", "--batch-size", "4", "--quick", "--threads", "1", "--dtype", dtype,
                 "--no-progress", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["model"], r["batch_size"], r["norm"]) for r in rows] == [("mlp", 4, "bn")]
    assert rows[0]["torch_ms"] > 0 and rows[0]["normlab_ms"] > 0
    assert "normlab ms" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["resnet", "mlp", "transformer"])
def test_models_are_what_they_say_and_convert(kind):
    import normlab

    model, x, y = build_model(kind, 2)
    kinds = {type(m) for m in model.modules()}
    want = {"resnet": torch.nn.BatchNorm2d, "mlp": torch.nn.BatchNorm1d, "transformer": torch.nn.LayerNorm}[kind]
    assert want in kinds
    assert model(x).shape == (2, 10) and y.shape == (2,)
    converted = normlab.convert(model, "lnc" if kind == "transformer" else "bn")
    assert want not in {type(m) for m in converted.modules()}
    assert converted(x).shape == (2, 10)


def test_small_mode(tmp_path, capsys):
    from normlab import bench_models

    out = tmp_path / "s.json"
    cases = bench_models.SMALL_CASES
    try:
        bench_models.SMALL_CASES = cases[:1] + cases[5:6]  # (bn and lnc: keep the smoke test short)
        assert main(["bench", "--small", "--quick", "--no-progress", "--json", str(out)]) == 0
    finally:
        bench_models.SMALL_CASES = cases
    rows = json.loads(out.read_text())["rows"]
    assert [r["torch_layer"] for r in rows] == ["BatchNorm2d", "LayerNorm"]
    assert all(r["fwd_us"] > 0 and r["torch_fwd_bwd_us"] > 0 for r in rows)
