"""Batch-instance norm (Nam & Kim 2018) and switchable norm (Luo, Ren & Peng 2019).

References are float64 numpy computations written from the papers' equations (moments
taken directly over the axes of x, not merged), or torch's native layers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import normlab
from _helpers import assert_channels_last_preserved, assert_layouts_agree
from normlab import functional as NF

BN_AXES, IN_AXES, LN_AXES = (0, 2, 3), (2, 3), (1, 2, 3)


def _x(shape=(4, 3, 5, 6), dtype=torch.float64) -> torch.Tensor:
    c = shape[1]
    scale = torch.tensor([0.5, 1.0, 3.0, 2.0][:c], dtype=dtype).view(1, c, *[1] * (len(shape) - 2))
    shift = torch.tensor([-2.0, 0.0, 4.0, 1.0][:c], dtype=dtype).view(1, c, *[1] * (len(shape) - 2))
    # per-sample offsets too, so instance, layer and batch moments all differ
    offset = torch.randn(shape[0], *[1] * (len(shape) - 1), dtype=dtype)
    return torch.randn(shape, dtype=dtype) * scale + shift + offset


def _pc(v, ndim=4) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).reshape([1, -1] + [1] * (ndim - 2))


def _std(x: np.ndarray, axes, eps: float) -> np.ndarray:
    mu = x.mean(axis=axes, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)


def _set(layer: nn.Module, **values) -> None:
    with torch.no_grad():
        for k, v in values.items():
            getattr(layer, k).copy_(torch.as_tensor(v, dtype=getattr(layer, k).dtype))


# ============================================================== batch-instance norm
def test_bin_matches_paper_train_and_eval():
    eps = 1e-5
    layer = normlab.BatchInstanceNorm(3).double()
    rho, gamma, beta = [0.0, 0.3, 1.0], [1.5, 0.5, -1.0], [0.1, 0.2, 0.3]
    _set(layer, rho=rho, weight=gamma, bias=beta)
    rm, rv = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = _x()
        xn = x.numpy()
        x_bn, x_in = _std(xn, BN_AXES, eps), _std(xn, IN_AXES, eps)
        expected = _pc(gamma) * (_pc(rho) * x_bn + (1 - _pc(rho)) * x_in) + _pc(beta)
        np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)
        m = xn.size // 3
        rm = 0.9 * rm + 0.1 * xn.mean(axis=BN_AXES)
        rv = 0.9 * rv + 0.1 * xn.var(axis=BN_AXES) * m / (m - 1)  # BN branch: torch's unbiased running var
    np.testing.assert_allclose(layer.running_mean.numpy(), rm, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), rv, rtol=1e-12)
    layer.eval()
    x = _x(shape=(2, 3, 4, 4))
    xn = x.numpy()
    x_bn = (xn - _pc(rm)) / np.sqrt(_pc(rv) + eps)  # running statistics in eval
    expected = _pc(gamma) * (_pc(rho) * x_bn + (1 - _pc(rho)) * _std(xn, IN_AXES, eps)) + _pc(beta)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("rho", [1.0, 0.0])
def test_bin_equivalences(rho):
    """rho = 1 is batch norm, rho = 0 is instance norm: outputs, gradients, eval."""
    layer = normlab.BatchInstanceNorm(3).double()
    ref = (nn.BatchNorm2d(3) if rho == 1 else nn.InstanceNorm2d(3, affine=True)).double()
    for m in (layer, ref):
        _set(m, weight=[1.5, 0.5, -1.0], bias=[0.1, 0.2, 0.3])
    _set(layer, rho=[rho] * 3)
    for _ in range(2):
        x = _x()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = layer(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        dy = torch.randn_like(ya)
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.weight.grad, ref.weight.grad)
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    if rho == 1:
        torch.testing.assert_close(layer.running_var, ref.running_var)
    layer.eval(), ref.eval()
    x = _x(shape=(2, 3, 4, 4))
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-10, atol=1e-10)


def test_bin_gradcheck():
    x = _x(shape=(3, 2, 3, 2)).requires_grad_()
    rho = torch.tensor([0.3, 0.8], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.3, -0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, r, w, b: NF.batch_instance_norm(x, r, None, None, w, b), (x, rho, w, b))


def test_bin_rho_kept_in_range_without_user_action():
    layer = normlab.BatchInstanceNorm(3)
    assert torch.all(layer.rho == 1)  # starts as batch norm
    opt = torch.optim.SGD(layer.parameters(), lr=10.0)
    x = _x(dtype=torch.float32)
    # a step that pushes rho outside [0, 1] in both directions
    layer(x).mul(torch.randn_like(x)).sum().backward()
    with torch.no_grad():
        layer.rho.grad.copy_(torch.tensor([-1.0, 1.0, 0.01]))
    opt.step()
    assert layer.rho.max() > 1 or layer.rho.min() < 0
    layer.zero_grad()
    y = layer(x)  # the forward clamps first, as the paper's post-step clamp would have
    assert torch.all((layer.rho >= 0) & (layer.rho <= 1))
    torch.testing.assert_close(layer.rho.detach(), torch.tensor([1.0, 0.0, 0.9]))
    y.mul(torch.randn_like(y)).sum().backward()
    assert torch.all(layer.rho.grad != 0)  # the gradient reaches rho even at the bounds
    # a layer applied twice in one graph (shared weights) still backpropagates
    layer.zero_grad()
    (layer(x) + layer(x * 2)).sum().backward()
    assert layer.rho.grad is not None


def test_bin_large_mean_keeps_precision():
    x64 = _x() + 1e4  # mean 1e4 times the spread: E[x^2] - E[x]^2 in float32 would be noise
    layer = normlab.BatchInstanceNorm(3)
    _set(layer, rho=[0.2, 0.5, 0.9])
    y = layer(x64.float())
    xn = x64.float().double().numpy()
    rho = _pc([0.2, 0.5, 0.9])
    expected = rho * _std(xn, BN_AXES, 1e-5) + (1 - rho) * _std(xn, IN_AXES, 1e-5)
    np.testing.assert_allclose(y.detach().double().numpy(), expected, atol=5e-3)


def test_bin_bad_inputs_leave_state_unchanged():
    layer = normlab.BatchInstanceNorm(3)
    layer(_x(dtype=torch.float32))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"BatchInstanceNorm\(3\).*rank >= 3"):
        layer(torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"BatchInstanceNorm\(3\).*more than one position.*\(4, 3, 1\)"):
        layer(torch.randn(4, 3, 1))
    with pytest.raises(ValueError, match=r"BatchInstanceNorm\(3\).*expected 3 channels.*got 5"):
        layer(torch.randn(4, 5, 3, 3))
    with pytest.raises(ValueError, match=r"BatchInstanceNorm\(3\).*more than one value"):
        layer(torch.randn(1, 3, 1, 1))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="needs positions"):
        NF.batch_instance_norm(torch.randn(4, 3), torch.ones(3))


# ============================================================== switchable norm
def _sn_reference(x, wm, wv, gamma, beta, eps, bn_stats=None):
    """Luo et al. eq. 3-5 with biased variances, moments taken directly over x's axes."""
    soft = lambda z: np.exp(z - np.max(z)) / np.exp(z - np.max(z)).sum()  # noqa: E731
    wm, wv = soft(np.asarray(wm, float)), soft(np.asarray(wv, float))
    stats = []
    for axes in (IN_AXES, LN_AXES, BN_AXES):
        mu = x.mean(axis=axes, keepdims=True)
        stats.append((mu, ((x - mu) ** 2).mean(axis=axes, keepdims=True)))
    if bn_stats is not None:
        stats[2] = (_pc(bn_stats[0]), _pc(bn_stats[1]))
    mean = sum(w * m for w, (m, _) in zip(wm, stats))
    var = sum(w * v for w, (_, v) in zip(wv, stats))
    return _pc(gamma) * (x - mean) / np.sqrt(var + eps) + _pc(beta)


def test_sn_matches_paper_train_and_eval():
    eps = 1e-5
    layer = normlab.SwitchableNorm(3).double()
    wm, wv, gamma, beta = [0.3, -0.5, 1.0], [1.2, 0.1, -0.4], [1.5, 0.5, -1.0], [0.1, 0.2, 0.3]
    _set(layer, mean_weight=wm, var_weight=wv, weight=gamma, bias=beta)
    rm, rv = np.zeros(3), np.ones(3)
    for _ in range(3):
        x = _x()
        xn = x.numpy()
        np.testing.assert_allclose(layer(x).detach().numpy(), _sn_reference(xn, wm, wv, gamma, beta, eps),
                                   rtol=1e-10, atol=1e-10)
        mu_b, var_b = xn.mean(axis=BN_AXES), xn.var(axis=BN_AXES)
        # running moments: a weighted merge (biased), batch weight 0.1
        rv = 0.9 * rv + 0.1 * var_b + 0.9 * 0.1 * (mu_b - rm) ** 2
        rm = 0.9 * rm + 0.1 * mu_b
    np.testing.assert_allclose(layer.running_mean.numpy(), rm, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), rv, rtol=1e-12)
    layer.eval()
    x = _x(shape=(2, 3, 4, 4))
    expected = _sn_reference(x.numpy(), wm, wv, gamma, beta, eps, bn_stats=(rm, rv))
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("pick", ["in", "ln", "bn"])
def test_sn_one_dominant_weight_is_that_method(pick):
    k = ["in", "ln", "bn"].index(pick)
    big = torch.zeros(3, dtype=torch.float64)
    big[k] = 60.0  # softmax weight 1 - 2e-26
    layer = normlab.SwitchableNorm(3).double()
    _set(layer, mean_weight=big, var_weight=big, weight=[1.5, 0.5, -1.0], bias=[0.1, 0.2, 0.3])
    w, b = layer.weight.detach(), layer.bias.detach()
    x = _x()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)
    ref = {
        "in": lambda t: TF.instance_norm(t, weight=w, bias=b, eps=1e-5),
        "ln": lambda t: TF.group_norm(t, 1, w, b, eps=1e-5),  # the channel-first layer norm
        "bn": lambda t: TF.batch_norm(t, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5),
    }[pick]
    ya, yb = layer(xa), ref(xb)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(ya)
    ya.backward(dy), yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-10)
    if pick == "bn":  # eval: batch norm with the layer's running statistics
        layer.eval()
        x = _x(shape=(2, 3, 4, 4))
        expected = TF.batch_norm(x, layer.running_mean, layer.running_var, w, b, training=False, eps=1e-5)
        torch.testing.assert_close(layer(x), expected, rtol=1e-10, atol=1e-10)


def test_sn_without_positions_mixes_layer_and_batch_only():
    eps = 1e-5
    layer = normlab.SwitchableNorm(4).double()
    wm, wv = [50.0, 0.2, -0.3], [-50.0, 0.4, 0.1]  # the instance weight is ignored either way
    _set(layer, mean_weight=wm, var_weight=wv)
    x = _x(shape=(6, 4))
    xn = x.numpy()
    soft = lambda z: np.exp(z) / np.exp(z).sum()  # noqa: E731
    a, c = soft(np.array(wm[1:])), soft(np.array(wv[1:]))
    mu_l, var_l = xn.mean(1, keepdims=True), xn.var(1, keepdims=True)
    mu_b, var_b = xn.mean(0, keepdims=True), xn.var(0, keepdims=True)
    expected = (xn - a[0] * mu_l - a[1] * mu_b) / np.sqrt(c[0] * var_l + c[1] * var_b + eps)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    assert normlab.registry.get_entry("sn").applies_to >= {"conv", "dense"}


def test_sn_recalibrate_gives_the_papers_batch_average():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), normlab.SwitchableNorm(3), nn.ReLU())
    model.train()
    for _ in range(3):  # some training-time running statistics to be replaced
        model(torch.randn(4, 2, 6, 6))
    batches = [torch.randn(4, 2, 6, 6) * (1 + i) + i for i in range(5)]
    model.eval()
    normlab.recalibrate(model, batches)
    with torch.no_grad():
        feats = [model[0](b).double().numpy() for b in batches]
    mu = np.stack([f.mean(axis=BN_AXES) for f in feats])
    var = np.stack([f.var(axis=BN_AXES) for f in feats])  # biased, as SN uses
    # Luo et al., main.py sn_helper: running_var = E[mu^2 + var] - E[mu]^2 over the batches
    np.testing.assert_allclose(model[1].running_mean.double().numpy(), mu.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(model[1].running_var.double().numpy(), (mu**2 + var).mean(0) - mu.mean(0) ** 2,
                               rtol=1e-5, atol=1e-6)
    assert model[1].momentum == 0.1 and not model.training


def test_sn_gradcheck():
    x = _x(shape=(3, 2, 3, 2)).requires_grad_()
    wm = torch.tensor([0.3, -0.5, 1.0], dtype=torch.float64, requires_grad=True)
    wv = torch.tensor([1.2, 0.1, -0.4], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.3, -0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: NF.switchable_norm(*t[:3], None, None, *t[3:]), (x, wm, wv, w, b))
    x2 = _x(shape=(4, 3)).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, m, v: NF.switchable_norm(x, m, v), (x2, wm, wv))


def test_sn_bad_inputs_leave_state_unchanged():
    layer = normlab.SwitchableNorm(3)
    layer(_x(dtype=torch.float32))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"SwitchableNorm\(3\).*expected 3 channels.*got 2"):
        layer(torch.randn(4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"SwitchableNorm\(3\).*more than one value"):
        layer(torch.randn(1, 3))
    with pytest.raises(TypeError, match=r"SwitchableNorm\(3\).*floating-point"):
        layer(torch.ones(4, 3, 2, dtype=torch.int32))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k


# ============================================================== shared: state, layout, conversion
LAYERS = {
    "bin": lambda: normlab.BatchInstanceNorm(3),
    "sn": lambda: normlab.SwitchableNorm(3),
}


def _randomize(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.2, 0.9)
    return layer


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_state_dict_round_trip(name):
    a = _randomize(LAYERS[name]())
    for _ in range(2):
        a(_x(dtype=torch.float32))
    sd = a.state_dict()
    extra = {"bin": {"rho"}, "sn": {"mean_weight", "var_weight"}}[name]
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"} | extra
    b = LAYERS[name]()
    b.load_state_dict(sd)
    a.eval(), b.eval()
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    b.reset_parameters()
    assert all(torch.all(getattr(b, k) == 1) for k in extra)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_channel_dim_last_equals_channel_first(name):
    first = _randomize(LAYERS[name]())
    last = LAYERS[name]()
    last.load_state_dict(first.state_dict())
    assert_layouts_agree(first, last, lambda: _x(dtype=torch.float32))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_channels_last_memory_preserved(name):
    layer, ref = _randomize(LAYERS[name]()), LAYERS[name]()
    ref.load_state_dict(layer.state_dict())
    assert_channels_last_preserved(layer, ref, _x(dtype=torch.float32))


@pytest.mark.parametrize("spec", ["bin", "sn"])
def test_convert(spec):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.GroupNorm(1, 3))
    with torch.no_grad():
        model[1].weight.fill_(0.5)
    normlab.convert(model, spec)
    kind = normlab.BatchInstanceNorm if spec == "bin" else normlab.SwitchableNorm
    assert isinstance(model[1], kind) and isinstance(model[4], kind)
    assert torch.all(model[1].weight == 0.5)
    x = torch.randn(4, 2, 6, 6)
    model(x).sum().backward()
    model.eval()
    assert model(x).shape == (4, 3, 4, 4)
    assert normlab.registry.get_entry(spec).batch_stats
