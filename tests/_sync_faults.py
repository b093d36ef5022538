"""Faults run inside tests/test_distributed.py's pair of gloo processes (issue 18, items 5
and 7): ranks that disagree, a rank that skipped a step, and a step where every rank is
empty. Each returns what this rank saw; the tests there compare the ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

import normlab


def _try(fn: Any) -> str:
    """Run ``fn``; the text of the error it raised ("" if none)."""
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank saw
        return f"{type(exc).__name__}: {exc}"
    return ""


def disagreeing_ranks(rank: int) -> dict[str, Any]:
    """Ranks that disagree, each on its own fresh group (so one scenario's skipped call does
    not reach the next): what each raised, and whether its running statistics moved."""
    out: dict[str, Any] = {}
    cases = {  # name: (this rank's channels, dtype)
        "channels": (6 if rank == 0 else 4, torch.float64),
        "dtype": (6, torch.float64 if rank == 0 else torch.float32),
    }
    for name, (c, dtype) in cases.items():
        group = dist.new_group([0, 1])
        bn = normlab.BatchNorm(c, process_group=group).to(dtype)
        out[name] = _try(lambda: bn(torch.randn(4, c, 3, dtype=dtype)))
        out[name + "_stats"] = (bn.running_mean.abs().max().item(), (bn.running_var - 1).abs().max().item())
        out[name + "_then"] = _try(lambda: dist.barrier(group))  # the group still works
    # the training flag (layers in eval never communicate; a functional caller may say either)
    from normlab._moments import Moments

    group = dist.new_group([0, 1])
    zeros = torch.zeros(1, 6, 1, dtype=torch.float64)
    out["training"] = _try(lambda: normlab.distributed.all_reduce_moments(Moments(4, zeros, zeros), group,
                                                                          training=rank == 0))
    # rank 0 raises in its own layer (a wrong input), catches it and goes on to the next step;
    # rank 1 runs the step: the next exchange pairs rank 0's call 2 with rank 1's call 1
    group = dist.new_group([0, 1])
    bn = normlab.BatchNorm(6, process_group=group).double()
    steps = []
    for step in range(2):
        bad = rank == 0 and step == 0
        if rank == 1 and step == 1:
            break
        steps.append(_try(lambda: bn(torch.randn(4, 5 if bad else 6, 3, dtype=torch.float64))))
    out["skipped"] = steps
    return out


def all_empty_step(specs: list[str], c: int, hw: int) -> dict[str, Any]:
    """One training step (forward and backward) of every synchronized norm where every rank
    holds zero samples, and the same layer unsynchronized: buffers before and after."""
    out = {}
    for spec in specs:
        for sync in (True, False):
            torch.manual_seed(0)
            norm = normlab.make_norm(spec, c).double()
            if sync:
                norm = normlab.convert_sync(norm)
            with torch.no_grad():
                for b in norm.buffers():
                    if b.is_floating_point():
                        b.uniform_(0.5, 2.0)
            before = {k: b.clone() for k, b in norm.named_buffers()}
            x = torch.randn(0, c, hw, hw, dtype=torch.float64, requires_grad=True)
            norm(x).sum().backward()
            out[spec, sync] = (before, {k: b.clone() for k, b in norm.named_buffers()})
    return out
