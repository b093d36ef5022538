"""param_groups: the papers' optimizer rules, each parameter in exactly one group."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab.layers.base import Norm


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bin = normlab.BatchInstanceNorm(4)
        self.bn = normlab.BatchNorm(4)
        self.tbn = nn.BatchNorm2d(4)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.spd = normlab.SPDBatchNorm(3)
        self.wn = normlab.weight_norm(nn.Linear(4, 4))
        self.head = nn.Linear(4, 2)
        self.tied = self.head  # shared module: its parameters count once


def by_id(groups):
    return {id(p): g for g in groups for p in g["params"]}


@pytest.mark.parametrize("norm_wd", [0.0, 1e-5])
def test_every_parameter_in_exactly_one_group_with_the_papers_rules(norm_wd):
    model = Model()
    groups = normlab.param_groups(model, lr=0.1, weight_decay=5e-4, norm_weight_decay=norm_wd)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    where = by_id(groups)
    rho = where[id(model.bin.rho)]
    assert rho["lr"] == pytest.approx(1.0) and rho["weight_decay"] == 0.0 and rho["params"] == [model.bin.rho]
    for m in (model.bin, model.bn, model.tbn, model.gn, model.ln):
        for p in (m.weight, m.bias):
            assert where[id(p)]["lr"] == 0.1 and where[id(p)]["weight_decay"] == norm_wd
    assert where[id(model.spd.bias_log)]["weight_decay"] == norm_wd
    for p in (model.conv.weight, model.conv.bias, model.head.weight, model.head.bias, model.wn.bias,
              model.wn.parametrizations.weight.original0, model.wn.parametrizations.weight.original1):
        assert where[id(p)]["lr"] == 0.1 and where[id(p)]["weight_decay"] == 5e-4
    assert sorted(g["name"] for g in groups) == ["default", "norm", "rho"]


def test_groups_drive_a_real_optimizer():
    model = Model()
    opt = torch.optim.SGD(normlab.param_groups(model, lr=0.01, weight_decay=0.1), lr=0.01)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # weight decay alone moves the parameters
    opt.step()
    after = dict(model.named_parameters())
    assert torch.equal(after["bn.weight"], before["bn.weight"])  # no decay on norm affine
    assert torch.equal(after["bin.rho"], before["bin.rho"])
    torch.testing.assert_close(after["head.weight"], before["head.weight"] * (1 - 0.01 * 0.1))


def test_rho_only_for_norms_and_empty_groups_left_out():
    class Gate(nn.Module):  # a non-norm parameter called rho is an ordinary parameter
        def __init__(self):
            super().__init__()
            self.rho = nn.Parameter(torch.ones(2))

    groups = normlab.param_groups(Gate(), lr=1.0, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["default"] and groups[0]["weight_decay"] == 0.1

    class MyNorm(Norm):  # any normlab norm's rho follows the batch-instance rule
        def __init__(self):
            super().__init__(2)
            self.rho = nn.Parameter(torch.ones(2))

    groups = normlab.param_groups(MyNorm(), lr=1.0, weight_decay=0.1)
    assert {g["name"]: len(g["params"]) for g in groups} == {"rho": 1, "norm": 2}
