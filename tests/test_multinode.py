"""Multi-node training with synchronized statistics: two torchrun "nodes" on this machine
(two launches on 127.0.0.1, c10d rendezvous, different node ranks, one process each) train
examples/ddp_train.py with batch norm synchronized; the weights, running statistics and
outputs after a few steps equal those of one process holding the whole (twice as large)
batch: the same global batches, the same moments, the same averaged gradients."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "ddp_train.py")
STEPS, BATCH = 3, 8

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    path = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    # loopback only: gloo's and the rendezvous' sockets on 127.0.0.1
    return {**os.environ, "PYTHONPATH": path, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}


def _train_args(dump: Path, batch: int) -> list[str]:
    return [EXAMPLE, "--norm", "bn", "--sync", "--batch-size", str(batch), "--epochs", "1", "--steps", str(STEPS),
            "--dump", str(dump)]


def _two_nodes(program: list[str], rdzv_id: str, cwd: Path) -> None:
    """Launch ``program`` on two torchrun "nodes" (one process each) on 127.0.0.1; both must succeed."""
    port = _free_port()
    nodes = [subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
         "--node-rank", str(rank), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
         "--rdzv-id", rdzv_id, "--local-addr", "127.0.0.1", "--max-restarts", "0", *program],
        cwd=cwd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    logs = []
    try:
        for node in nodes:
            logs.append(node.communicate(timeout=300)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert all(n.returncode == 0 for n in nodes), "\n----\n".join(logs)


def test_two_nodes_synchronized_equal_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    two = tmp_path / "two-nodes.pt"
    _two_nodes(_train_args(two, BATCH), "normlab-test", tmp_path)
    one = tmp_path / "one-process.pt"
    single = subprocess.run([sys.executable, *_train_args(one, 2 * BATCH)], capture_output=True, text=True,
                            timeout=240, env={**_env(), "MASTER_PORT": str(_free_port())})
    assert single.returncode == 0, single.stderr

    a, b = torch.load(two), torch.load(one)
    assert (a["world"], b["world"], a["steps"], b["steps"]) == (2, 1, STEPS, STEPS)
    assert a["state"].keys() == b["state"].keys()
    for key in a["state"]:  # conv weights, bn affine, running mean/var, batch counts
        torch.testing.assert_close(a["state"][key].double(), b["state"][key].double(), rtol=1e-4, atol=1e-5,
                                   msg=lambda m, key=key: f"{key}: {m}")
    torch.testing.assert_close(a["outputs"].double(), b["outputs"].double(), rtol=1e-4, atol=1e-4)
    # the check has teeth: the running statistics moved away from their initial values
    assert a["state"]["1.running_mean"].abs().max() > 1e-3


def test_study_cell_across_two_nodes_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    """`normlab study --nproc 2 --sync on` under torchrun (two "nodes", one process each): rank 0
    stores the cell; its learning curve equals the same cell run in one process at batch 16."""
    from normlab.study import CellConfig, Store, run_cell

    db = tmp_path / "r.sqlite"
    study = ["study", "--task", "digits", "--norms", "bn", "--batch-sizes", "8", "--seeds", "1", "--epochs", "1",
             "--train-subset", "96", "--width", "2", "--nproc", "2", "--sync", "on", "--db", str(db), "-q"]
    _two_nodes(["-m", "normlab.cli", "--", *study], "normlab-study", tmp_path)
    with Store(db) as store:
        rows = store.rows()
        curve = store.curves()[rows[0]["key"]]
    assert len(rows) == 1 and rows[0]["nproc"] == 2 and rows[0]["sync"] == 1 and rows[0]["global_batch_size"] == 16
    whole = CellConfig.from_row({**rows[0], "nproc": 1, "sync": False, "batch_size": 16, "global_batch_size": 16})
    ref = run_cell(whole)  # one process, the whole batch of 16
    assert rows[0]["steps"] == ref.steps and len(curve) == len(ref.curve)
    for (e, loss, metric), (e1, loss1, metric1) in zip(curve, ref.curve):
        assert e == e1 and (loss is None) == (loss1 is None)
        if loss is not None:
            assert abs(loss - loss1) <= 1e-4 * max(1.0, abs(loss1))
        assert abs(metric - metric1) <= 1.0 / rows[0]["val_size"] + 1e-12  # at most one example flips
