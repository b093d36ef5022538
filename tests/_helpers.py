"""Small helpers shared by the test modules (import as ``from _helpers import ...``)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn


def randomize_affine(m: nn.Module) -> nn.Module:
    """Give a norm's affine parameters values away from their 1/0 initialization."""
    with torch.no_grad():
        if getattr(m, "weight", None) is not None:
            m.weight.uniform_(0.5, 1.5)
        if getattr(m, "bias", None) is not None:
            m.bias.uniform_(-0.5, 0.5)
    return m


def assert_matches_torch_layer(ours: nn.Module, ref: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Output, input gradient and every parameter gradient of ``ours`` equal ``ref``'s on ``x``."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-5, atol=1e-6)
    for name, p in ref.named_parameters():
        torch.testing.assert_close(dict(ours.named_parameters())[name].grad, p.grad, rtol=1e-5, atol=1e-5)
    return ya


def assert_layouts_agree(first: nn.Module, last: nn.Module, make_x, steps: int = 2) -> None:
    """A channel-first layer and its ``channel_dim=-1`` twin (same state) agree after ``movedim``
    in training (outputs and running statistics) and then in eval; and channels_last memory
    in gives channels_last out with the channel-first values."""
    last.channel_dim = -1
    for _ in range(steps):
        x = make_x()
        torch.testing.assert_close(last(x.movedim(1, -1)), first(x).movedim(1, -1))
    for k, v in first.state_dict().items():
        torch.testing.assert_close(last.state_dict()[k], v)
    first.eval(), last.eval()
    x = make_x()
    torch.testing.assert_close(last(x.movedim(1, -1)), first(x).movedim(1, -1))


def assert_channels_last_preserved(layer: nn.Module, ref: nn.Module, x: torch.Tensor) -> None:
    """``layer`` on channels_last memory returns channels_last memory equal to ``ref`` on ``x``."""
    for training in (True, False):
        layer.train(training), ref.train(training)
        y = layer(x.to(memory_format=torch.channels_last))
        assert y.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y, ref(x))


def study_rows(db: object) -> list[dict]:
    """Every row of a study database's ``runs`` table, read with plain sqlite3."""
    import sqlite3

    con = sqlite3.connect(str(db))
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM runs")]
    finally:
        con.close()


def norm_and_activation(m):
    """(the norm, its activation's name or None) of a converted norm + activation layer: a
    ``NormAct`` wrapper, or a normlab norm with a fused activation (``make_norm(..., act=)``)."""
    import normlab
    from normlab.layers.norm_act import fusable_activation

    if isinstance(m, normlab.NormAct):
        named = fusable_activation(m.act)
        return m.norm, named[0] if named else type(m.act).__name__
    act = getattr(m, "act", None)
    return m, (fusable_activation(act)[0] if act is not None else None)


def graph_nodes(y: torch.Tensor) -> set[str]:
    """Class names of every node in ``y``'s autograd graph (which backend ran)."""
    seen, stack, names = set(), [y.grad_fn], set()
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        names.add(type(f).__name__)
        stack.extend(g for g, _ in f.next_functions)
    return names


def assert_streaming_changes_nothing(passes: Callable[[int], Sequence[torch.Tensor]]) -> Sequence[torch.Tensor]:
    """``passes(off)`` (kernel calls writing outputs that start ``off`` elements into their storage)
    give bit-identical results with the kernels' streaming stores forced on and off, for outputs
    on and off a 64-byte line; returns the last streamed results."""
    from normlab import _kernels

    for off in (0, 1):
        with _kernels.streaming(-1):
            plain = passes(off)
        with _kernels.streaming(0):
            streamed = passes(off)
        for i, (p, s) in enumerate(zip(plain, streamed)):
            assert torch.equal(p, s), f"output {i} (offset {off}) differs when streamed"
    return streamed
