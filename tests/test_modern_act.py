"""Fused norm + activation (``make_norm(spec, C, act=...)``) against the norm followed by
torch's activation, and in-place activated batch norm against torch's BN + leaky ReLU."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlab
from normlab.layers import NormAct

ACTS = {"relu": TF.relu, "leaky_relu": TF.leaky_relu, "silu": TF.silu, "gelu": TF.gelu}


def _backward_agrees(ours, ref, ya, yb, xa, xb):
    """Same input, weight and bias gradients and running statistics after one backward."""
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    for name in ("weight", "bias"):
        torch.testing.assert_close(getattr(ours, name).grad, getattr(ref, name).grad)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(ref, name))


def _rand_affine(m):
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-0.5, 0.5)
    return m


@pytest.mark.parametrize("act", list(ACTS))
def test_bn_act_equals_torch_bn_then_activation(act):
    ours = _rand_affine(normlab.make_norm("bn", 6, act=act, dtype=torch.float64))
    ref = nn.BatchNorm2d(6, dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())  # same keys as a plain batch norm
    for mode in (True, False):
        ours.train(mode), ref.train(mode)
        x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ACTS[act](ref(xb))
        torch.testing.assert_close(ya, yb)
        _backward_agrees(ours, ref, ya, yb, xa, xb)


@pytest.mark.parametrize("spec", ["gn:2", "ln", "in", "frn", "evos0:2", "pn", "lnc", "rms"])
def test_every_statistics_norm_takes_an_activation(spec):
    fused = normlab.make_norm(spec, 4, act="silu")
    plain = normlab.make_norm(spec, 4)
    plain.load_state_dict(fused.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(fused(x), TF.silu(plain(x)))
    assert "silu" in repr(fused)


def test_activation_errors():
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        normlab.make_norm("bn", 4, act="tanh")
    with pytest.raises(ValueError, match="not a normlab norm"):
        normlab.make_norm("none", 4, act="relu")
    with pytest.raises(ValueError, match=r"GroupNorm.*inplace_abn needs batch norm"):
        normlab.make_norm("gn:2", 4, act="leaky_relu", inplace_abn=True)
    with pytest.raises(ValueError, match="inplace_abn needs batch norm"):
        normlab.make_norm("bn", 4, act="relu", inplace_abn=True)


@pytest.mark.parametrize("channel_dim", [1, -1])
def test_inplace_abn_equals_unfused_and_keeps_only_its_output(channel_dim):
    abn = _rand_affine(normlab.make_norm("bn", 6, act="leaky_relu", inplace_abn=True, negative_slope=0.1,
                                         dtype=torch.float64, channel_dim=channel_dim))
    assert isinstance(abn, normlab.InPlaceABN)
    ref = nn.BatchNorm2d(6, dtype=torch.float64)
    ref.load_state_dict(abn.state_dict())
    with torch.no_grad():
        ref.weight.add_(abn.abn_eps)  # the invertible scale |gamma| + eps, gamma > 0 here
    for mode in (True, False):
        abn.train(mode), ref.train(mode)
        x = torch.randn(4, 6, 5, 5, dtype=torch.float64) * 2 + 1
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        xin = xa.movedim(1, -1) if channel_dim == -1 else xa
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            ya = abn(xin)
        ya = ya.movedim(-1, 1) if channel_dim == -1 else ya
        yb = TF.leaky_relu(ref(xb), 0.1)
        torch.testing.assert_close(ya, yb)
        big = [t for t in saved if t.numel() >= x.numel()]
        assert len(big) == 1 and big[0].data_ptr() == ya.data_ptr()  # only the output, not x
        _backward_agrees(abn, ref, ya, yb, xa, xb)


def test_inplace_abn_gradcheck_and_state_dict():
    abn = _rand_affine(normlab.InPlaceABN(3, negative_slope=0.2, dtype=torch.float64))
    x = torch.randn(4, 3, 3, dtype=torch.float64, requires_grad=True)
    fresh = copy.deepcopy(abn)
    assert torch.autograd.gradcheck(lambda x, w, b: normlab.functional.batch_norm_leaky_relu_inplace(
        x, None, None, w, b, negative_slope=0.2), (x, abn.weight, abn.bias))
    abn(x)
    fresh.load_state_dict(abn.state_dict())
    assert torch.equal(fresh.running_mean, abn.running_mean)
    with pytest.raises(ValueError, match=r"InPlaceABN\(3\).*negative_slope"):
        normlab.InPlaceABN(3, negative_slope=0.0)


class TimmStyleBatchNormAct2d(nn.BatchNorm2d):
    """timm.layers.BatchNormAct2d's structure (timm cannot be imported here: its torchvision
    import fails): a BatchNorm2d subclass with children ``drop`` and ``act`` applied after it."""

    def __init__(self, num_features, act=None, drop=None):
        super().__init__(num_features)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


@pytest.mark.parametrize("act, fused", [(nn.ReLU(inplace=True), "relu"), (nn.LeakyReLU(0.2), "leaky_relu"),
                                        (nn.SiLU(), "silu"), (nn.Hardswish(), None)])
@pytest.mark.parametrize("spec", ["bn", "gn:2", "none"])
def test_convert_keeps_a_norm_act_layers_activation(act, fused, spec):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), TimmStyleBatchNormAct2d(4, act=act))
    ref = copy.deepcopy(model)
    normlab.convert(model, spec)
    new = model[1]
    if fused is not None and spec != "none":
        assert new.act.name == fused
    x = torch.randn(2, 3, 6, 6)
    if spec == "bn":
        torch.testing.assert_close(model(x), ref(x))
    else:
        plain = copy.deepcopy(model)
        if isinstance(plain[1], NormAct):  # not fused: the norm inside the wrapper
            plain[1] = plain[1].norm
        else:  # the activation fused into the norm: take it out (a hook, or the engine's epilogue)
            plain[1]._forward_hooks.clear()
            del plain[1].act
        torch.testing.assert_close(model(x), act(plain(x).clone()))
    if spec != "none":  # (an Identity is no norm: converting it again is a no-op)
        normlab.convert(model, "bn")  # and on again: still one activation
        torch.testing.assert_close(model(x), ref(x))


def test_convert_keeps_dropout_then_activation_in_order():
    layer = TimmStyleBatchNormAct2d(4, act=nn.ReLU(), drop=nn.Dropout(0.5))
    new = normlab.convert(layer, "bn")
    assert isinstance(new, NormAct) and isinstance(new.drop, nn.Dropout) and isinstance(new.act, nn.ReLU)
    new.eval(), layer.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(new(x), layer(x))
