"""Frozen batch norm (spec ``frozenbn``) and ``normlab.freeze``/``unfreeze``; torch's
eval-mode BatchNorm is the reference."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normlab
from _helpers import randomize_affine


def _trained_bn(c: int = 6, **kw) -> nn.BatchNorm2d:
    bn = randomize_affine(nn.BatchNorm2d(c, **kw))
    with torch.no_grad():
        for _ in range(3):
            bn(torch.randn(8, c, 4, 4) * 3 + 2)
    return bn


@pytest.mark.parametrize("affine", [True, False])
def test_frozen_equals_eval_batchnorm_in_training_and_saves_only_scales(affine):
    bn = _trained_bn(affine=affine).eval()
    frozen = normlab.make_norm("frozenbn", 6, affine=affine, eps=bn.eps)
    frozen.load_state_dict(bn.state_dict())  # torch's keys, num_batches_tracked dropped
    frozen.train()
    x = torch.randn(4, 6, 5, 5, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
        y = frozen(x)
    yr = bn(xr)
    torch.testing.assert_close(y, yr)
    g = torch.randn_like(y)
    y.backward(g), yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    assert saved and max(saved) == 6  # one scale per channel, nothing input-sized
    assert list(frozen.parameters()) == [] and set(frozen.state_dict()) == (
        {"weight", "bias", "running_mean", "running_var"} if affine else {"running_mean", "running_var"})


def test_frozen_channels_last_and_channel_dim():
    bn = _trained_bn().eval()
    frozen = normlab.convert(copy.deepcopy(bn), "frozenbn")
    x = torch.randn(2, 6, 3, 3)
    y = frozen(x.to(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, bn(x))
    last = normlab.make_norm("frozenbn", 6, channel_dim=-1)
    last.load_state_dict(frozen.state_dict())
    torch.testing.assert_close(last(x.movedim(1, -1)), bn(x).movedim(1, -1))


def test_freeze_survives_train_and_unfreeze_restores():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), _trained_bn(momentum=0.01), nn.ReLU(), nn.Conv2d(6, 4, 1),
                          normlab.BatchNorm(4), nn.GroupNorm(2, 4))
    with torch.no_grad():
        model[4](torch.randn(8, 4, 3, 3) + 1)
    model.eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        y = model(x)
    normlab.freeze(model)
    assert isinstance(model[1], normlab.FrozenBatchNorm) and isinstance(model[4], normlab.FrozenBatchNorm)
    assert isinstance(model[5], nn.GroupNorm)  # not a batch norm: left alone, no warning needed
    model.train()
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)
    assert all(p.requires_grad for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in (model[0].parameters())) + 4 * 6 + 4 + 4 * 2
    normlab.unfreeze(model)
    assert isinstance(model[1], normlab.BatchNorm) and model[1].weight.requires_grad
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), y)


def test_freeze_rejects_norms_without_a_frozen_form():
    with pytest.raises(ValueError, match="can be frozen"):
        normlab.freeze(nn.Sequential(nn.GroupNorm(2, 4)), "gn")


def test_fold_frozen_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 6, 3), normlab.convert(_trained_bn().eval(), "frozenbn")).eval()
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        y = model(x)
        normlab.fold_batchnorm(model)
        assert isinstance(model[1], nn.Identity)
        torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5)


def test_freeze_without_running_statistics_raises_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.BatchNorm2d(4, track_running_stats=False))
    with pytest.raises(ValueError, match=r"2 \(BatchNorm2d, 4 channels\): a frozen batch norm needs running statistics"):
        normlab.freeze(model)
    assert isinstance(model[1], nn.BatchNorm2d) and isinstance(model[2], nn.BatchNorm2d)
    with pytest.raises(ValueError, match="needs running statistics"):
        normlab.convert(nn.Sequential(nn.LayerNorm(4)), "frozenbn")
