"""``normlab bench``: argument validation (clear message, exit code 2, no traceback), the
whole-model and small-input modes, the legend and the loaded-machine warning."""

from __future__ import annotations

import json

import pytest
import torch

from normlab._kernels._build import cpu_vectors
from normlab.bench import paired_ratio_interval
from normlab.bench_cli import LOADED_SPREAD, faults_warning, loaded_warning, slower_line
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
    (["--norms", "bn+tanh"], "unknown activation 'tanh' after '+'; known: relu, leaky_relu, silu, gelu"),
    (["--norms", "foo+relu"], "unknown norm 'foo'"),
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
    assert data["verdict"].startswith("verdict: ") and data["verdict"] in captured.out  # (its rule: the test below)
    # the header says which vector extension the kernels run on (their speed depends on it)
    assert data["cpu"] == cpu_vectors() and captured.out.startswith(f"torch {torch.__version__}, 1 threads, {data['cpu']}, ")


@pytest.mark.parametrize("flags, want", [
    ("fpu sse2 avx avx2 fma f16c", "AVX2"),
    ("sse2 avx avx2 avx512f avx512bw avx512vl", "AVX-512"),
    ("avx2 avx512f avx512_bf16 avx512_fp16", "AVX-512 BF16"),
    ("sse2 avx", "AVX"),
])
def test_cpu_vectors_reads_the_widest_extension_from_the_flags(flags, want, monkeypatch):
    from normlab._kernels import _build

    monkeypatch.setattr(_build, "_cpu_key", lambda: f"model name\t: Some CPU\nflags\t\t: {flags}")
    assert _build.cpu_vectors() == want
    monkeypatch.setattr(_build, "_cpu_key", lambda: "model name\t: no flags line")
    assert _build.cpu_vectors() not in ("AVX2", "AVX-512", "AVX-512 BF16", "AVX")


def test_layer_intervals_pair_each_round(monkeypatch):
    """The /BN 95% interval is of the per-round ratios: a machine that slows down round by round
    (both layers alike) leaves bn's ratio to torch's BatchNorm2d exactly 2 in every round."""
    import normlab.bench as bench

    real_step, calls = bench._step, {"k": 0}

    def named_step(case, kind):
        step = real_step(case, kind)
        return lambda: (step(), case.name)[1]

    def drifting_time(f):
        got = f()
        k, calls["k"] = calls["k"], calls["k"] + 1
        drift = 1.0 + k // 10  # a round: the copy, then three layers x (fwd, fwd+bwd, eval)
        return {"bn": 2.0, "BatchNorm2d": 1.0}.get(got, 1.0) * drift if isinstance(got, str) else drift

    monkeypatch.setattr(bench, "_step", named_step)
    monkeypatch.setattr(bench, "time_ms", drifting_time)
    result = bench.run_bench((2, 4, 3, 3), norms=["bn"], threads=1, repeats=5, warmup=1)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["bn"]["ratio_to_native_bn_interval"] == (2.0, 2.0)
    assert rows["bn"]["ratio_to_native_bn"] == pytest.approx(2.0)
    assert rows["BatchNorm2d"]["ratio_to_native_bn_interval"] is None  # (the baseline itself)
    # the A/A control (an exact copy of the baseline, same rounds) reads 1 where the layers are equal
    assert rows["BatchNorm2d (A/A copy)"]["native"]
    assert result["aa"] == {"ratio": pytest.approx(1.0), "interval": (1.0, 1.0)}


def test_the_baseline_is_torchs_batch_norm_also_beside_fused_rows():
    """With only a fused row (whose torch pair, "BatchNorm2d then relu", is native too), /native
    BN is still over torch's BatchNorm2d alone, and the A/A control copies that layer."""
    import normlab.bench as bench

    result = bench.run_bench((2, 4, 3, 3), norms=["bn+relu"], threads=1, repeats=2, warmup=0)
    rows = {r["name"]: r for r in result["rows"]}
    assert rows["BatchNorm2d"]["ratio_to_native_bn"] == 1.0
    assert rows["BatchNorm2d then relu"]["ratio_to_native_bn_interval"] is not None
    assert set(rows) == {"bn+relu", "bn then relu", "BatchNorm2d then relu", "BatchNorm2d", "BatchNorm2d (A/A copy)"}
    assert isinstance(result["aa"]["ratio"], float)


@pytest.mark.parametrize("shape,norms", [((2, 4, 3, 3), ["gn:2"]), ((2, 4, 3, 3), ["bn", "lnc"]),
                                          ((2, 4, 2, 3, 3), ["in"])])
def test_every_case_gets_its_gradient_in_its_input_layout(shape, norms, monkeypatch):
    """Channels-last runs time every layer, torch's BatchNorm baseline too (also when ``bn`` is not
    among the norms, and in 5-d), with an incoming gradient laid out as its input: a gradient in
    another layout times torch's slow mixed-layout backward (106 ms instead of 8 for its
    BatchNorm2d at the default shape, the bench's baseline before this was fixed)."""
    import normlab.bench as bench

    real_step, seen = bench._step, {}

    def recording_step(case, kind):
        seen[case.name] = (case.x.stride(), case.dy.stride())
        return real_step(case, kind)

    monkeypatch.setattr(bench, "_step", recording_step)
    bench.run_bench(shape, norms=norms, channels_last=True, threads=1, repeats=1, warmup=0)
    assert any(name.startswith("BatchNorm") for name in seen)
    for name, (x_stride, dy_stride) in seen.items():
        assert x_stride == dy_stride, name


def test_loaded_warning_names_the_baseline():
    assert loaded_warning({"copy": 0.1}) is None
    w = loaded_warning({"copy": 0.1, "torch BatchNorm": LOADED_SPREAD + 0.2})
    assert w is not None and "torch BatchNorm 50%" in w and "copy" not in w.split("(")[1].split(";")[0]


def test_verdict_names_the_layers_slower_than_torch_and_over_their_goal():
    def row(name, bn, bn_iv, cp=None, cp_iv=None, counterpart=None, goal=None, native=False):
        return {"name": name, "native": native, "ratio_to_native_bn": bn, "ratio_to_native_bn_interval": bn_iv,
                "ratio_to_counterpart": cp, "ratio_to_counterpart_interval": cp_iv, "counterpart": counterpart,
                "goal": goal}
    rows = [
        row("BatchNorm2d", 1.0, None, native=True),
        row("gn", 1.3, [1.2, 1.4], 1.1, [1.05, 1.2], "GroupNorm(32)"),  # over its own torch layer
        row("lnc", 1.3, [1.2, 1.4], 0.6, [0.55, 0.65], "LayerNorm"),    # over BN, under its own layer: fine
        row("sn", 1.1, [1.02, 1.3]),                                    # no torch layer: against BN
        row("on", 1.1, [0.98, 1.3]),                                    # cannot tell: not named
        row("pn", 1.01, [1.004, 1.1]),                                  # low end reads 1.00: not named
        row("dyt", 1.3, [1.2, 1.4], 1.6, [1.55, 1.7], "tanh", 1.5),     # over its goal
        row("derf", 1.3, [1.2, 1.4], 1.4, [1.3, 1.6], "tanh", 1.5),     # within its goal
        row("bn then relu", 2.0, [1.9, 2.1], 1.2, [1.1, 1.3], "BatchNorm2d then relu"),
        row("sn (contiguous)", 1.5, [1.4, 1.6]),
    ]
    line = slower_line(rows)
    assert line.startswith("verdict: slower than torch's in this run")
    slower, over = line.split("; over their goal: ")
    assert "gn 1.10 (1.05-1.20) of torch GroupNorm(32)" in slower and "sn 1.10 (1.02-1.30) of torch's BatchNorm" in slower
    for quiet in ("lnc", " on ", "pn", "derf", "then", "contiguous", "BatchNorm2d 1"):
        assert quiet not in line, quiet
    assert over == "dyt 1.60 (1.55-1.70) of tanh"
    assert slower_line([rows[0], rows[4]]).startswith("verdict: no layer is slower")


def test_faults_note_names_the_layers_that_took_page_faults():
    rows = [{"name": "bn", "page_faults_per_step": 0.5}, {"name": "BatchNorm2d", "page_faults_per_step": 6272}]
    note = faults_warning(rows, "default")
    assert note is not None and "BatchNorm2d 6272" in note and "bn " not in note and "--malloc steady" in note
    assert faults_warning(rows[:1], "default") is None
    assert faults_warning(rows, "steady (glibc trim/mmap thresholds raised)") is None


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_model_mode_times_both_models(dtype, tmp_path, capsys):
    out = tmp_path / "m.json"
    assert main(["bench", "--model", "mlp", "--batch-size", "4", "--quick", "--threads", "1", "--dtype", dtype,
                 "--no-progress", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["rows"]
    assert data["cpu"] == cpu_vectors() and data["threads"] == 1
    assert [(r["model"], r["batch_size"], r["norm"]) for r in rows] == [("mlp", 4, "bn")]
    assert rows[0]["torch_ms"] > 0 and rows[0]["normlab_ms"] > 0
    assert 0 < rows[0]["ratio_low"] <= rows[0]["ratio_high"]
    assert rows[0]["copy_ms"] > 0 and 0 < rows[0]["aa_low"] <= rows[0]["aa_high"]
    assert rows[0]["aa_ratio"] == pytest.approx(rows[0]["copy_ms"] / rows[0]["torch_ms"])
    assert all(rows[0][f"{arm}_faults"] >= 0 for arm in ("torch", "normlab", "copy"))
    out = capsys.readouterr().out
    assert "normlab ms" in out and "A/A" in out


def test_paired_ratio_interval_sees_through_a_machine_that_slows_both():
    """Round-to-round slowdowns common to both models drop out of the paired interval: a true
    ratio of 1.10 under a 2x swing of the machine is found to within a few percent, and equal
    steps give exactly 1."""
    gen = torch.Generator().manual_seed(0)
    machine = 1 + torch.rand(15, generator=gen)  # each round's slowdown, 1x-2x
    noise = 1 + 0.02 * (torch.rand(15, generator=gen) - 0.5)
    theirs = (100 * machine).tolist()
    ours = (110 * machine * noise).tolist()
    low, high = paired_ratio_interval(ours, theirs)
    assert 1.08 < low <= 1.10 <= high < 1.12
    assert paired_ratio_interval(theirs, theirs) == (1.0, 1.0)
    assert paired_ratio_interval([2.0], [1.0]) == (2.0, 2.0)


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


def test_default_norms_include_the_new_specs_and_a_fused_row():
    from normlab.bench import DEFAULT_NORMS, split_act
    from normlab.registry import parse_spec

    for spec in ("frn", "evob0", "grn", "pn", "dyt", "derf"):
        assert spec in DEFAULT_NORMS
    assert any(s.startswith("evos0:") for s in DEFAULT_NORMS)
    assert any(split_act(s)[1] == "relu" for s in DEFAULT_NORMS)
    for spec in DEFAULT_NORMS:
        parse_spec(split_act(spec)[0])  # every default is a real spec
    assert split_act("bn+relu") == ("bn", "relu") and split_act("gn:8+ws") == ("gn:8+ws", None)
    assert split_act("gn:4+SiLU") == ("gn:4", "silu")


def test_elementwise_and_fused_rows_point_at_their_baselines(tmp_path, capsys):
    """dyt/derf are measured against one torch.tanh row on the channel-last tensor, bn+relu
    against normlab bn then relu, which is measured against torch's BatchNorm2d then relu."""
    out = tmp_path / "b.json"
    assert main(["bench", "--shape", "2,8,3,3", "--norms", "dyt,derf,bn+relu,frn,evob0,evos0:4,grn,pn", "--quick",
                 "--threads", "1", "--no-progress", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "torch.tanh forward+backward" in text and "goal" in text.splitlines()[1]
    data = json.loads(out.read_text())
    assert data["skipped"] == {}
    rows = {r["name"]: r for r in data["rows"]}
    assert [n for n in rows if n == "tanh"] == ["tanh"] and rows["tanh"]["native"]
    nbytes = 2 * 8 * 3 * 3 * 4
    assert rows["tanh"]["saved_bytes"] == nbytes  # its output
    assert nbytes <= rows["dyt"]["saved_bytes"] < nbytes + 64  # x, and parameter-sized tensors
    for name, counterpart, goal in (("dyt", "tanh", 1.5), ("derf", "tanh", 1.5), ("bn+relu", "bn then relu", 0.8),
                                    ("bn then relu", "BatchNorm2d then relu", None)):
        r = rows[name]
        assert r["counterpart"] == counterpart and r["goal"] == goal
        assert r["ratio_to_counterpart"] == pytest.approx(r["train_fwd_bwd_ms"] / rows[counterpart]["train_fwd_bwd_ms"])
    assert rows["BatchNorm2d then relu"]["native"] and not rows["bn then relu"]["native"]
    for spec in ("frn", "evob0", "evos0:4", "grn", "pn"):
        assert rows[spec]["ratio_to_native_bn"] > 0 and rows[spec]["saved_bytes"] > 0


def test_goal_rows_compute_what_their_names_say():
    """The fused layer, normlab's norm then the activation and torch's norm then it give one
    result (same parameters), and the tanh row is torch.tanh: the ratios compare like with like."""
    from normlab.bench import TANH, _Case, _goal_cases, _native_for, _layer

    torch.manual_seed(0)
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    dy = torch.randn_like(x)
    fused = _layer("bn+silu", 6)
    case = _Case("bn+silu", fused, x, dy, False)
    extra = _goal_cases(case, "bn", "silu", _native_for("bn", 6, 4), _layer("bn", 6), torch.float32, set())
    assert [k.name for k in extra] == ["bn then silu", "BatchNorm2d then silu"] and case.counterpart == "bn then silu"
    with torch.no_grad():
        for m in (fused, extra[0].module[0], extra[1].module[0]):
            m.weight.copy_(torch.linspace(-1, 2, 6))
            m.bias.copy_(torch.linspace(0.5, -0.5, 6))
    ref = torch.nn.functional.silu(torch.nn.functional.batch_norm(x, None, None, torch.linspace(-1, 2, 6),
                                                                  torch.linspace(0.5, -0.5, 6), training=True))
    for m in (fused, extra[0].module, extra[1].module):
        torch.testing.assert_close(m.train()(x), ref, atol=1e-5, rtol=1e-5)
    el = _Case("dyt", _layer("dyt", 6, channel_dim=-1), x, dy, False)
    (tanh,) = _goal_cases(el, "dyt", None, None, _layer("dyt", 6), torch.float32, {"bn"})
    assert tanh.name == TANH and el.goal == 1.5
    torch.testing.assert_close(tanh.module(x), torch.tanh(x))
    assert _goal_cases(el, "dyt", None, None, _layer("dyt", 6), torch.float32, {TANH}) == []


def test_rounds_alternate_and_rotate_so_no_case_always_follows_the_copy():
    """ABBA in pairs of rounds (the second the first reversed), each pair rotated: over the rounds
    every case runs first, right after the copy, and each position is held by several cases."""
    from normlab.bench import _round_order

    cases = list(range(10))
    orders = [_round_order(cases, r) for r in range(20)]
    for r in range(0, 20, 2):
        assert orders[r + 1] == orders[r][::-1] and sorted(orders[r]) == cases
    assert {o[0] for o in orders} == set(cases)
    assert orders[0] == cases and orders[2][0] == 7
