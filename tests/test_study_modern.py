"""The study takes the norms since 2020 where they apply: dyt and derf in the transformer task,
frn, evob0, evos0, grn, pn and GN + weight standardization (``gn:G+ws``) in the CNN tasks."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from normlab.study import CellConfig, get_task, resolve_norms, run_cell


def _cell(task: str, norm: str, **kw: object) -> CellConfig:
    fields = dict(task=task, norm=norm, batch_size=16, seed=0, epochs=1, base_lr=0.05, train_subset=64, width=4)
    fields.update(kw)
    return CellConfig(**fields)  # type: ignore[arg-type]


def test_default_norms_per_task() -> None:
    digits, transformer, mnist1d = get_task("digits"), get_task("transformer"), get_task("mnist1d")
    assert {"frn", "evob0", "evos0:4", "grn", "pn", "gn:4+ws"} <= set(digits.default_norms())
    assert {"dyt", "derf", "lnc", "rmsc"} <= set(transformer.default_norms())
    assert not any(s.endswith("+ws") for s in transformer.default_norms())  # no convs to standardize
    # the default study (README quick start) keeps its fixed 13 norms: it does not grow
    assert mnist1d.default_norms() == ["bin", "bn", "brn", "gn:4", "in", "ln", "lnc", "mobn", "none", "on", "rms",
                                       "rmsc", "sn"]
    assert resolve_norms(digits, ["gn+ws", "gn:2+ws"], 16)[0] == ["gn:4+ws", "gn:2+ws"]
    with pytest.raises(ValueError, match="norm 'lnc\\+ws' for task 'transformer'.*normlab.convert"):
        resolve_norms(transformer, ["lnc+ws"], 16)


@pytest.mark.parametrize("spec", ["dyt", "derf"])
def test_transformer_slots_and_a_cell_with_dyt_derf(spec: str) -> None:
    task = get_task("transformer")
    m = task.build_model(spec, 4)
    slots = [mod for name, mod in m.named_modules() if name.endswith(("norm1", "norm2")) or name == "norm"]
    assert len(slots) == 5
    h = torch.randn(3, 8, 8)
    for s in slots:  # at init: gamma = 1, beta = 0, alpha = 0.5 (and derf's shift 0), on the last axis
        with torch.no_grad():
            s.weight.copy_(torch.linspace(0.5, 2.0, 8))
        ref = torch.linspace(0.5, 2.0, 8) * (torch.tanh if spec == "dyt" else torch.erf)(0.5 * h)
        torch.testing.assert_close(s(h), ref)
    r = run_cell(_cell("transformer", spec))
    assert r.status == "ok" and r.steps == 4 and r.val_size == 359
    assert math.isfinite(r.final_train_loss) and 0 <= r.val_metric <= 1


def test_gn_ws_cnn_has_standardized_conv_weights() -> None:
    """``gn:4+ws``: each conv's weight is its raw weight standardized per output channel over
    the fan-in (float64, by hand), the norms are GN with 4 groups, and the model computes what
    the plain ``gn:4`` model computes with those weights."""
    task = get_task("digits")
    torch.manual_seed(0)
    ws = task.build_model("gn:4+ws", 4)
    torch.manual_seed(0)
    plain = task.build_model("gn:4", 4)
    convs = [m for m in ws.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 3
    assert [(type(m).__name__, m.num_groups) for m in ws.modules() if hasattr(m, "num_groups")] == [("GroupNorm", 4)] * 3
    for conv, ref in zip(convs, [m for m in plain.modules() if isinstance(m, nn.Conv2d)]):
        raw = conv.parametrizations.weight.original
        assert torch.equal(raw, ref.weight)  # the same initialisation as the plain model
        w = raw.detach().double().flatten(1)
        want = (w - w.mean(1, keepdim=True)) / torch.sqrt(((w - w.mean(1, keepdim=True)) ** 2).mean(1, keepdim=True) + 1e-5)
        torch.testing.assert_close(conv.weight.double().flatten(1), want, atol=1e-6, rtol=1e-6)
        eff, init = conv.weight.detach().flatten(1), ref.weight.detach().flatten(1)
        assert eff.mean(1).abs().max() < 1e-6 and ((eff ** 2).mean(1) - 1).abs().max() < 0.01  # eps in the root
        assert (init ** 2).mean(1).max() < 0.5  # the plain init is not standardized
        with torch.no_grad():
            ref.weight.copy_(conv.weight)
    x = torch.randn(5, 1, 8, 8)
    torch.testing.assert_close(ws.train()(x), plain.train()(x), atol=1e-5, rtol=1e-5)
    r = run_cell(_cell("digits", "gn:4+ws", batch_size=8, base_lr=0.1))
    assert r.status == "ok" and r.steps == 8 and 0 <= r.val_metric <= 1
    assert r.param_count == sum(p.numel() for p in plain.parameters())  # no extra parameters


@pytest.mark.parametrize("spec", ["frn", "evob0", "evos0:4", "grn", "pn"])
def test_cnn_cells_with_the_new_norms(spec: str) -> None:
    r = run_cell(_cell("digits", spec, batch_size=8, base_lr=0.1))
    assert r.status == "ok" and r.steps == 8 and 0 <= r.val_metric <= 1
