"""``normlab reproduce``: the verdict rule, the claims' definitions, and two claims end to end
(``--quick --seeds 2``) with reproduce.json checked against its own rule and the store."""

from __future__ import annotations

import dataclasses
import json
import math
import sqlite3
import statistics

import pytest
import torch

from normlab.cli import main
from normlab.study.reproduce.claims import CLAIMS, Arm, get_claims
from normlab.study.reproduce.run import availability, evaluate_claims, run_claims
from normlab.study.reproduce.verdict import paired_stats, verdict
from normlab.study.store import Store
from normlab.study.tasks import DataMissingError, get_task

ISSUE_IDS = ["gn-small-batch", "brn-micro-batch", "sn-small-batch", "on-batch-one", "wn-mobn", "ln-rnn",
             "in-contrast", "input-scaling", "snn-deep-mlp", "bn-high-lr", "ghn-no-bn", "spd-bn", "sync-bn",
             "gn-ws", "frn-batch-one", "dyt-ln"]


# ------------------------------------------------------------------ the rule
def _by_hand(diffs: list[float]) -> tuple[float, float]:
    return statistics.fmean(diffs), statistics.stdev(diffs) / math.sqrt(len(diffs))


@pytest.mark.parametrize("diffs, expected", [
    ([0.10, 0.12, 0.09, 0.11], "reproduced"),     # d = 0.105, se ~ 0.0065
    ([-0.10, -0.12, -0.09, -0.11], "contradicted"),
    ([0.05, -0.04, 0.02, -0.01], "inconclusive"),  # d = 0.005, se ~ 0.02
    ([0.03, 0.01], "inconclusive"),               # d = 0.02, se = 0.01: d = 2 se exactly is not > 2 se
])
def test_verdict_rule_on_hand_made_numbers(diffs: list[float], expected: str) -> None:
    d, se = paired_stats(diffs)
    hd, hse = _by_hand(diffs)
    assert d == pytest.approx(hd, abs=1e-15) and se == pytest.approx(hse, rel=1e-12)
    assert verdict(d, se) == expected


def test_within_rule() -> None:
    assert verdict(*paired_stats([0.01, -0.02, 0.015, -0.005])) == "inconclusive"
    assert verdict(*paired_stats([0.01, -0.02, 0.015, -0.005]), rule="within") == "reproduced"
    assert verdict(*paired_stats([0.10, 0.12, 0.09, 0.11]), rule="within") == "contradicted"
    assert verdict(*paired_stats([-0.10, -0.12, -0.09, -0.11]), rule="within") == "contradicted"
    assert verdict(0.0, 0.0, rule="within") == "reproduced"
    assert verdict(math.nan, 0.1) == "inconclusive"
    with pytest.raises(ValueError, match="rule must be one of"):
        verdict(0.1, 0.1, rule="two-sided")


def test_identical_arms_reproduce_a_within_claim() -> None:
    """sync-bn.match's edge, on hand-made errors counted in validation images: arms computing the
    same thing give d = 0 and se = 0, which the within rule calls reproduced; the same non-zero
    difference on every seed (se = 0, or an ulp from it) is contradicted; the note says which."""
    from normlab.study.reproduce.run import same_difference_note

    sync = [707 / 2000, 866 / 2000]
    same = [b - a for a, b in zip(sync, list(sync))]
    d, se = paired_stats(same)
    assert (d, se) == (0.0, 0.0)
    assert verdict(d, se, rule="within") == "reproduced" and verdict(d, se) == "inconclusive"
    assert "same difference (se = 0), +0 of 2000 validation examples" in same_difference_note(same, "within", 2000)
    one_off = [708 / 2000 - 707 / 2000, 865 / 2000 - 864 / 2000]  # one image apart on both seeds
    d, se = paired_stats(one_off)
    assert d == pytest.approx(0.0005) and se < 1e-15
    assert verdict(d, se, rule="within") == "contradicted"
    note = same_difference_note(one_off, "within", 2000)
    assert note is not None and "+1 of 2000" in note and "needs d = 0 exactly" in note
    assert same_difference_note(one_off, "directional") == ("every seed gave the same difference (se = 0): the rule "
                                                            "then reads d alone")
    assert same_difference_note([0.1, 0.2], "within", 2000) is None and same_difference_note([0.1], "within") is None


# ------------------------------------------------------------ the claims
def test_the_issue_claims_are_all_defined_and_paired() -> None:
    assert [c.id for c in CLAIMS] == ISSUE_IDS
    for claim in CLAIMS:
        names = [a.name for a in claim.arms]
        assert len(set(names)) == len(names), claim.id
        used = {n for comp in claim.comparisons for n in comp.arms}
        assert used <= set(names), claim.id
        assert len({comp.suffix for comp in claim.comparisons}) == len(claim.comparisons)
        if availability(claim) is not None:
            continue
        for quick in (True, False):
            cells = claim.cells([0, 1], quick)
            keys = [c.key() for cs in cells.values() for c in cs]
            assert len(set(keys)) == len(keys), claim.id  # every arm x seed is its own cell
            for cs in cells.values():  # paired: seed s of every arm has the seed s
                assert [c.seed for c in cs] == [0, 1]
    with pytest.raises(ValueError, match="unknown claim id"):
        get_claims(["gn-small-batch", "no-such-claim"])


def test_claim_tasks_load_real_data_and_build() -> None:
    spd = get_task("reproduce/digits-cov")
    x, y = spd.arrays("")
    assert x.shape == (1797, 7, 7) and y.shape == (1797,)
    assert torch.linalg.cholesky_ex(torch.from_numpy(x).double()).info.eq(0).all()  # SPD descriptors
    model = spd.build_model("spdbn")
    assert model(torch.from_numpy(x[:8])).shape == (8, 10)
    raw, std = get_task("reproduce/cancer-raw"), get_task("reproduce/cancer-std")
    a, b = raw.split(0, 0.2, 2000, 0), std.split(0, 0.2, 2000, 0)
    assert torch.equal(a.y_val, b.y_val)  # the same split: only the scaling differs
    torch.testing.assert_close(b.x_train.double().mean(0), torch.zeros(30, dtype=torch.float64), atol=1e-5, rtol=0)
    assert a.x_train.amax() > 1000 and a.x_train.abs().amin() < 1e-2
    with pytest.raises(ValueError, match="reproduce/seq-digits.*one of lstm, ln-lstm, bn-lstm"):
        get_task("reproduce/seq-digits").build_model("gru")


def test_a_claim_whose_spec_is_missing_is_reported_not_run(tmp_path) -> None:
    claim = get_claims(["input-scaling"])[0]
    fake = dataclasses.replace(claim, id="fake", arms=(Arm("x", "digits", "no-such-norm"), claim.arms[1]))
    with Store(tmp_path / "db.sqlite") as store:
        skipped = run_claims([fake], [0, 1], True, store, progress=False)
        assert skipped["fake"].startswith("no-such-norm not available")
        result = evaluate_claims([fake], [0, 1], True, store, skipped)
        assert store.rows() == []  # nothing ran, nothing stored
    (entry,) = result["claims"]
    assert entry["verdict"].startswith("not run: no-such-norm not available")
    assert entry["d"] is None and entry["differences"] == []


@pytest.mark.parametrize("claim_id, spec", [("gn-ws", "gn:8+ws"), ("frn-batch-one", "frn"), ("dyt-ln", "dyt")])
def test_claims_on_the_modern_norms_run(claim_id: str, spec: str) -> None:
    """Claims 14-16 (gn:8+ws, frn, dyt and the transformer task) are available, quick and full,
    and every arm's model trains one step on its real data."""
    (claim,) = get_claims([claim_id])
    assert availability(claim, quick=True) is None and availability(claim, quick=False) is None
    assert spec in {arm.norm for arm in claim.arms}
    for arm in claim.arms:
        cell = claim.cell(arm, 0, True)
        task = get_task(cell.task)
        try:
            split = task.split(0, cell.val_fraction, cell.val_max, cell.train_subset, cell.data_dir)
        except DataMissingError as e:  # a system package (.ci/run installs it)
            pytest.skip(str(e))
        model = task.build_model(cell.norm, cell.width).train()
        bs = max(cell.batch_size, 2)
        task.loss(model(split.x_train[:bs]), split.y_train[:bs]).backward()


# ------------------------------------------------------------ end to end
@pytest.mark.slow
def test_two_claims_end_to_end_quick(tmp_path) -> None:
    db, out = tmp_path / "r.sqlite", tmp_path / "out"
    argv = ["reproduce", "--claims", "input-scaling,bn-high-lr", "--quick", "--seeds", "2", "--db", str(db),
            "--out", str(out), "--workers", "1", "-q"]
    assert main(argv) == 0
    result = json.loads((out / "reproduce.json").read_text())
    assert result["quick"] is True and result["seeds"] == [0, 1]
    entries = {e["id"]: e for e in result["claims"]}
    assert list(entries) == ["input-scaling", "bn-high-lr.a-high-lr", "bn-high-lr.b-steps"]

    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    rows = {r["key"]: dict(r) for r in conn.execute("SELECT * FROM runs")}
    assert len(rows) == 2 * 2 + 4 * 2  # arms x seeds, each once
    for e in entries.values():
        for field in ("id", "source", "paper_result", "setup", "metric", "lower_is_better", "arms", "direction",
                      "differences", "d", "se", "verdict"):
            assert field in e, field
        (better, worse) = list(e["arms"])  # these comparisons are "better beats worse", lower is better
        # per-seed values are the store's rows
        for arm, keys in e["cells"].items():
            for seed, key in enumerate(keys):
                row = rows[key]
                assert row["seed"] == seed and row["norm"] == e["fields"][arm].split(", ")[1]
                if e["id"].endswith("b-steps"):  # epochs until error <= 0.1, from the stored curve
                    curve = conn.execute("SELECT epoch, val_metric FROM curves WHERE key = ? ORDER BY point",
                                         (key,)).fetchall()
                    hit = [ep for ep, m in curve if m is not None and m <= 0.1]
                    want = hit[0] if hit else row["epochs"] + 1 / row["curve_points"]
                elif row["status"] == "ok":
                    want = row["val_metric"]
                else:  # diverged: chance error
                    want = 1 - 1 / get_task(row["task"]).num_classes
                assert e["arms"][arm][seed] == pytest.approx(want, abs=1e-12)
        # d, se and the verdict recomputed from the per-seed values
        diffs = [w - b for b, w in zip(e["arms"][better], e["arms"][worse])]
        assert e["differences"] == pytest.approx(diffs, abs=1e-12)
        d, se = _by_hand(diffs)
        assert e["d"] == pytest.approx(d, abs=1e-12) and e["se"] == pytest.approx(se, abs=1e-12)
        expected = "reproduced" if d > 2 * se else "contradicted" if d < -2 * se else "inconclusive"
        assert e["verdict"] == expected
    md = (out / "reproduce.md").read_text()
    assert "d > 2 se" in md and "| **input-scaling** |" in md
    assert (out / "input-scaling.png").stat().st_size > 1000 and (out / "bn-high-lr.png").is_file()

    # resume: a second invocation runs nothing and reports the same numbers
    stamps = {k: r["finished_at"] for k, r in rows.items()}
    assert main(argv) == 0
    again = json.loads((out / "reproduce.json").read_text())
    assert [e["arms"] for e in again["claims"]] == [e["arms"] for e in result["claims"]]
    assert {r[0]: r[1] for r in conn.execute("SELECT key, finished_at FROM runs")} == stamps
    conn.close()


def test_backend_other_than_local_is_a_clear_error(tmp_path, capsys) -> None:
    try:
        import normlab.study.backends  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("the study's backend interface is present: --backend goes through it")
    rc = main(["reproduce", "--claims", "input-scaling", "--backend", "ray", "--db", str(tmp_path / "r.sqlite"),
               "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "only 'local' is available" in capsys.readouterr().err


def test_ws_probe_tells_weight_standardized_convs_apart() -> None:
    """Claim 14's guard: a "+ws" spec must give convs whose weights are standardized."""
    from torch import nn

    from normlab.study.reproduce.run import standardizes_convs

    class WSConv(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            w = self.weight
            mean = w.mean(dim=(1, 2, 3), keepdim=True)
            std = (w - mean).square().mean(dim=(1, 2, 3), keepdim=True).add(1e-10).sqrt()
            return self._conv_forward(x, (w - mean) / std, self.bias)

    torch.manual_seed(0)
    plain = nn.Sequential(nn.Conv2d(1, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.GroupNorm(2, 8))
    ws = nn.Sequential(WSConv(1, 8, 3), nn.GroupNorm(2, 8), nn.ReLU(), WSConv(8, 8, 3), nn.GroupNorm(2, 8))
    assert not standardizes_convs(plain, (1, 8, 8))
    assert standardizes_convs(ws, (1, 8, 8))


def test_ws_task_standardizes_or_says_why() -> None:
    """Claim 14's arms build on ``normlab.weight_standardize``: where it exists the convs are
    weight-standardized (the probe passes); where not, building is a clear error."""
    from normlab.study.reproduce.run import standardizes_convs

    task = get_task("reproduce/fashion-ws")
    with pytest.raises(ValueError, match="expected a 'NORM\\+ws' spec"):
        task.build_model("gn:8")
    try:
        from normlab import weight_standardize  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="weight standardization"):
            task.build_model("gn:8+ws")
        return
    assert standardizes_convs(task.build_model("gn:8+ws"), task.input_shape)
    assert not standardizes_convs(get_task("fashion-mnist").build_model("gn:8"), task.input_shape)
    # the study's own tasks build "+ws" through normlab.convert: standardized too
    assert standardizes_convs(get_task("fashion-mnist").build_model("gn:8+ws"), task.input_shape)
