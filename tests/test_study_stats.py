"""The report's statistics: paired differences with a t-interval checked against a hand
computation, the resolution of one validation example, fewer than 3 seeds, the words of the
recommendation and of the batch-size section, an incomplete grid, and a report that writes
only inside its folder whatever the database holds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from normlab.study import CellConfig, CellResult, Store
from normlab.study.analysis import batch_moves, standings, studies_from_rows
from normlab.study.report import grid_status, md, recommendations, safe_name, sensitivity, write_report
from normlab.study.stats import paired_difference
from normlab.study.tables import put_note

T975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student's t, two-sided 95%, df 2 and 3 (printed tables)


def _row(norm: str, bs: int, seed: int, err: float | None, step: float = 1e-3, val_size: int = 100,
         task: str = "digits") -> dict:
    cfg = CellConfig(task=task, norm=norm, batch_size=bs, seed=seed, epochs=1, base_lr=0.1)
    return {"key": f"{task}{norm}{bs}{seed}", **cfg.to_dict(), "status": "ok" if err is not None else "diverged",
            "val_metric": err, "median_step_s": step, "saved_bytes_per_sample": 1.0, "param_count": 1,
            "metric": "error", "val_size": val_size}


def test_paired_interval_matches_a_hand_computation() -> None:
    a = {0: 0.10, 1: 0.12, 2: 0.15, 7: 0.5}  # seed 7 has no partner: left out
    b = {0: 0.08, 1: 0.11, 2: 0.11}
    d = [0.02, 0.01, 0.04]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = T975[2] * sd / math.sqrt(3)
    p = paired_difference(a, b)
    assert p.n == 3 and p.mean == pytest.approx(mean, abs=1e-15)
    assert p.low == pytest.approx(mean - half, rel=1e-9) and p.high == pytest.approx(mean + half, rel=1e-9)
    # pairing matters: the same values unpaired would give a far wider interval (sd of each ~0.02)
    assert p.high - p.low < 0.1
    four = paired_difference({s: v for s, v in enumerate([0.3, 0.2, 0.25, 0.28])}, {s: 0.2 for s in range(4)})
    d4 = [0.1, 0.0, 0.05, 0.08]
    m4 = sum(d4) / 4
    h4 = T975[3] * math.sqrt(sum((x - m4) ** 2 for x in d4) / 3) / 2
    assert (four.low, four.high) == (pytest.approx(m4 - h4), pytest.approx(m4 + h4))


def test_fewer_than_three_seeds_gives_no_interval() -> None:
    p = paired_difference({0: 0.2, 1: 0.3}, {0: 0.1, 1: 0.1})
    assert p.n == 2 and p.mean == pytest.approx(0.15) and not p.estimated and not p.beyond(0.0)
    (st,) = studies_from_rows([_row(n, 8, s, e) for n, s, e in
                               [("a", 0, 0.1), ("a", 1, 0.1), ("b", 0, 0.3), ("b", 1, 0.4)]], {})
    (text,) = recommendations(st)
    assert "intervals cannot be estimated" in text and "Worse beyond" not in text
    assert [v for _, _, v in batch_moves(st)] == []  # one batch size: no batch-size section


def test_standings_resolution_margin_and_words() -> None:
    rows = []
    a = [0.100, 0.120, 0.110]
    for s in range(3):
        rows += [_row("a", 8, s, a[s], step=0.002, val_size=1000),
                 _row("b", 8, s, a[s] + [0.003, -0.001, 0.002][s], step=0.001, val_size=1000),  # close: CI ends < 1 pt
                 _row("f", 8, s, a[s] + [0.03, -0.01, 0.02][s], step=0.0001, val_size=1000),  # CI includes 0, too wide
                 _row("c", 8, s, [0.30, 0.31, 0.33][s], step=0.0005, val_size=1000),  # far worse
                 _row("e", 8, s, a[s] + [0.0005, 0.001, 0.0][s], step=0.003, val_size=1000),  # < one example
                 _row("d", 8, s, [0.01, None, 0.01][s], val_size=1000)]  # a seed diverged
    (st,) = studies_from_rows(rows, {})
    assert st.val_size == 1000 and st.resolution == 0.001 and st.margin(0.11) == 0.01
    got = {s.cell.norm: s for s in standings(st, 8)}
    assert {n: s.verdict for n, s in got.items()} == {"a": "best", "b": "close", "f": "within", "c": "worse",
                                                      "e": "tied", "d": "diverged"}
    d = [0.003, -0.001, 0.002]  # b's interval by hand
    m = sum(d) / 3
    half = T975[2] * math.sqrt(sum((x - m) ** 2 for x in d) / 2) / math.sqrt(3)
    assert got["b"].diff.high == pytest.approx(m + half) and m + half < 0.01 < got["f"].diff.high
    (text,) = recommendations(st)
    assert "lowest mean validation error (%) is a (11.00, 3 seeds)" in text
    assert "e is within one validation example of it" in text
    assert "As good as far as the data show (the 95% interval of the difference includes zero and ends within " \
           "1.00 points): b (+0.13 points, 95% CI [" in text
    assert "too wide to call it as good (it reaches beyond 1.00 points): f (+1.33 points" in text
    assert "Of the norms as good as it, the cheapest is b (1.00 ms per step, vs 2.00)" in text  # never f
    assert "Worse beyond the interval: c (+20.33 points, 95% CI [" in text
    assert "Diverged: d (1 of 3 seeds)" in text


def test_batch_size_section_paired_over_seeds() -> None:
    rows = []
    for s in range(3):
        rows += [_row("bn", 2, s, [0.30, 0.32, 0.35][s]), _row("bn", 64, s, [0.10, 0.12, 0.11][s]),
                 _row("gn", 2, s, [0.10, 0.14, 0.11][s]), _row("gn", 64, s, [0.11, 0.12, 0.13][s])]
    (st,) = studies_from_rows(rows, {})
    moves = {n: (d, v) for n, d, v in batch_moves(st)}
    d = [0.20, 0.20, 0.24]
    m = sum(d) / 3
    half = T975[2] * math.sqrt(sum((x - m) ** 2 for x in d) / 2) / math.sqrt(3)
    assert moves["bn"][0].low == pytest.approx(m - half) and moves["bn"][1] == "depends"
    assert moves["gn"][1] == "steady"
    bn, gn = sensitivity(st)  # largest change first
    assert bn.startswith("- bn: 11.00 at batch 64 → 32.33 at batch 2 (+21.33 points, 95% CI [")
    assert bn.endswith("depends on the batch size)") and gn.startswith("- gn: ")


def _result(err: float) -> CellResult:
    return CellResult(status="ok", metric="error", val_metric=err, final_train_loss=0.1, median_step_s=1e-3,
                      saved_bytes_per_sample=100.0, param_count=10, steps=5, train_size=10, val_size=50, lr=0.1,
                      wall_s=0.5, curve=((0.0, None, 0.9), (1.0, 0.5, err)))


def _store_grid(db: Path, task: str, seeds: int, planned_seeds: int) -> None:
    with Store(db) as store:
        cfgs = [CellConfig(task=task, norm=n, batch_size=b, seed=s, epochs=1, base_lr=0.1)
                for n in ("bn", "none") for b in (4, 8) for s in range(seeds)]
        for i, c in enumerate(cfgs):
            store.write(c, _result(0.1 + 0.01 * i))
        put_note(store, cfgs[0].study_key(), "grid",
                 {"norms": ["bn", "none"], "batch_sizes": [4, 8], "seeds": list(range(planned_seeds))})


def test_incomplete_grid_is_flagged_at_the_top(tmp_path: Path) -> None:
    db = tmp_path / "r.sqlite"
    _store_grid(db, "digits", seeds=2, planned_seeds=3)
    report = write_report(db, tmp_path / "rep").read_text()
    head = report.split("## ", 1)[0]
    assert "INCOMPLETE GRID: 8 of 12 runs stored (4 missing)" in head
    db2 = tmp_path / "full.sqlite"
    _store_grid(db2, "digits", seeds=3, planned_seeds=3)
    assert "INCOMPLETE" not in write_report(db2, tmp_path / "rep2").read_text()
    # without a stored plan: the norms x batch sizes x seeds seen
    with Store(db2) as store:
        rows = [r for r in store.rows() if not (r["norm"] == "bn" and r["batch_size"] == 8 and r["seed"] == 2)]
    (st,) = studies_from_rows(rows, {})
    assert grid_status(st).startswith("INCOMPLETE GRID: 11 of 12 runs stored")


@pytest.mark.parametrize("task", ["../../x", "/abs/x", "..", "a/../../b<script>*[x](y)|"])
def test_report_writes_only_inside_out(tmp_path: Path, task: str) -> None:
    task = task.replace("/abs", str(tmp_path / "abs"))
    db = tmp_path / "db" / "r.sqlite"
    db.parent.mkdir()
    _store_grid(db, task, seeds=3, planned_seeds=3)
    out = tmp_path / "deep" / "er" / "out"
    before = {p for p in tmp_path.rglob("*")}
    report = write_report(db, out)
    # SQLite's own -shm/-wal files beside a WAL database (a read-only reader makes them) are not the report's
    new = {p for p in tmp_path.rglob("*")} - before - {db.with_name(db.name + s) for s in ("-shm", "-wal")}
    assert new and all(p == out or out in p.parents or p in out.parents for p in new), sorted(map(str, new))
    assert {p.suffix for p in out.iterdir()} == {".png", ".md"} and report.parent == out
    text = report.read_text()
    assert md(task) in text and (md(task) == task or task not in text)  # escaped, never raw markup
    assert "<script>" not in text and "[x](y)" not in text
    assert all(safe_name(task) in p.name for p in out.glob("*.png"))


def test_safe_name_and_md() -> None:
    assert safe_name("../../x") == "x" and safe_name("/etc/passwd") == "etc_passwd" and safe_name("..") == "study"
    assert safe_name("mod.sub:factory") == "mod.sub_factory"
    assert md("a*b_[c](d)<e>\n#|") == r"a\*b\_\[c\](d)&lt;e&gt; #\|"
