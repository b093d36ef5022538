"""Weight standardization, scaled WS, adaptive gradient clipping, normalizer-free models,
"+ws" and "cbn" conversions, and cross-iteration batch norm against float64 references
written from the papers' equations."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as TF
from torch import nn
from torch.nn.utils import parametrize

import normlab

D = torch.float64


def ref_ws(w, eps, gain=None):
    flat = w.reshape(w.shape[0], -1)
    mu = flat.mean(1, keepdim=True)
    var = ((flat - mu) ** 2).mean(1, keepdim=True)
    out = (flat - mu) / torch.sqrt(var + eps)
    if gain is not None:
        out = out * gain.reshape(-1, 1) / math.sqrt(flat.shape[1])
    return out.reshape(w.shape)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_weight_standardization_matches_equation(scaled, kind):
    layer = nn.Conv2d(3, 5, 3, padding=1, dtype=D) if kind == "conv" else nn.Linear(7, 5, dtype=D)
    with torch.no_grad():
        layer.weight.mul_(30 / layer.weight.std())
    raw = layer.weight.detach().clone().requires_grad_()
    bias = layer.bias.detach().clone().requires_grad_()
    normlab.weight_standardize(layer, scaled=scaled, eps=1e-5)
    gain = None
    if scaled:
        gain_p = layer.parametrizations.weight[0].gain
        assert torch.equal(gain_p, torch.ones(5, dtype=D))
        with torch.no_grad():
            gain_p.uniform_(0.5, 1.5)
        gain = gain_p.detach().clone().requires_grad_()
    x = torch.randn(2, 3, 6, 6, dtype=D) if kind == "conv" else torch.randn(4, 7, dtype=D)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = layer(xa)
    w_ref = ref_ws(raw, 1e-5, gain)
    yb = TF.conv2d(xb, w_ref, bias, padding=1) if kind == "conv" else TF.linear(xb, w_ref, bias)
    torch.testing.assert_close(ya, yb)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(layer.parametrizations.weight.original.grad, raw.grad)
    torch.testing.assert_close(layer.bias.grad, bias.grad)
    if scaled:
        torch.testing.assert_close(layer.parametrizations.weight[0].gain.grad, gain.grad)
    normlab.remove_weight_standardization(layer)
    assert not parametrize.is_parametrized(layer)
    torch.testing.assert_close(layer.weight.detach(), w_ref.detach())


def test_weight_standardize_bad_input():
    with pytest.raises(TypeError, match="weight_standardize: expected a Linear or Conv"):
        normlab.weight_standardize(nn.ConvTranspose2d(3, 3, 3))
    conv = normlab.weight_standardize(nn.Conv2d(3, 3, 3))
    with pytest.raises(ValueError, match="already weight-standardized"):
        normlab.weight_standardize(conv)


def ref_agc(p, g, clipping, eps):
    out = g.clone()
    units = [...] if p.ndim <= 1 else range(p.shape[0])
    for i in units:
        w_n = max(p[i].norm().item(), eps)
        g_n = g[i].norm().item()
        if g_n > clipping * w_n:
            out[i] = g[i] * (clipping * w_n / max(g_n, 1e-6))
    return out


def test_adaptive_clip_grad_unit_wise():
    conv = nn.Conv2d(2, 4, 3, dtype=D)
    lin = nn.Linear(3, 2, dtype=D)
    scalar = nn.Parameter(torch.tensor(0.0, dtype=D))
    unused = nn.Parameter(torch.ones(3, dtype=D))
    with torch.no_grad():
        conv.weight[0].zero_()  # ||W_0|| < eps: clipped relative to eps
    params = [conv.weight, conv.bias, lin.weight, lin.bias, scalar]
    grads = [torch.randn_like(p) * s for p, s in zip(params, [0.05, 1.0, 0.001, 0.0001, 1.0])]
    with torch.no_grad():
        grads[0][1] *= 1e-6  # one conv unit under the threshold: unchanged
    for p, g in zip(params, grads):
        p.grad = g.clone()
    before = [p.detach().clone() for p in params]
    expected = [ref_agc(p.detach(), g, 0.05, 1e-3) for p, g in zip(params, grads)]
    normlab.adaptive_clip_grad_(params + [unused], 0.05, 1e-3)
    for p, e, b in zip(params, expected, before):
        torch.testing.assert_close(p.grad, e)
        assert torch.equal(p.detach(), b)
    assert unused.grad is None
    assert torch.equal(conv.weight.grad[1], grads[0][1])
    assert not torch.equal(conv.weight.grad[0], grads[0][0])
    # defaults on module.parameters()
    for p, g in zip(params, grads):
        p.grad = g.clone()
    normlab.adaptive_clip_grad_(conv.parameters())
    torch.testing.assert_close(conv.weight.grad, ref_agc(conv.weight.detach(), grads[0], 0.01, 1e-3))


def test_normalizer_free():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          normlab.GroupNorm(8, 2), nn.SiLU(), nn.Flatten(), nn.Linear(8 * 16, 2))
    normlab.normalizer_free(model)
    assert isinstance(model[1], nn.Identity) and isinstance(model[4], nn.Identity)
    assert parametrize.is_parametrized(model[0]) and parametrize.is_parametrized(model[3])
    assert not parametrize.is_parametrized(model[7])  # the classifier keeps its weight
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(model[2](x), TF.relu(x) * 1.7139588594436646)
    w = model[0].weight
    torch.testing.assert_close(w.flatten(1).mean(1), torch.zeros(8), atol=1e-6, rtol=0)
    model(x).sum().backward()


def test_convert_ws_suffix():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Linear(6, 8), nn.LayerNorm(8))
    normlab.convert(model, "gn:4+ws")
    assert isinstance(model[1], normlab.GroupNorm) and model[1].num_groups == 4
    assert parametrize.is_parametrized(model[0]) and not parametrize.is_parametrized(model[3])
    assert isinstance(model[4], normlab.GroupNorm) and model[4].channel_dim == -1  # no conv before it: no WS
    with pytest.raises(ValueError, match=r"'\+ws' standardizes the conv.* normlab.convert\(model, 'gn:4\+ws'\)"):
        normlab.make_norm("gn:4+ws", 8)  # it cannot see the conv: an error, not a plain gn under the +ws name
    with pytest.raises(ValueError, match="unknown norm 'xx'"):
        normlab.convert(model, "xx+ws")


# ------------------------------------------------------------------ cross-iteration BN
def _mu_nu_and_derivatives(conv, x):
    """mu_c, nu_c of conv(x) and their derivatives w.r.t. W_c, written with unfold (no autograd)."""
    patches = TF.unfold(x, 3, padding=1)  # (N, Cin*9, L)
    w = conv.weight.detach().reshape(conv.out_channels, -1)
    y = torch.einsum("ok,nkl->nol", w, patches) + conv.bias.detach().reshape(1, -1, 1)
    cnt = y.shape[0] * y.shape[2]
    mu, nu = y.mean((0, 2)), (y * y).mean((0, 2))
    dmu = patches.sum((0, 2)).expand(conv.out_channels, -1) / cnt
    dnu = 2 * torch.einsum("nol,nkl->ok", y, patches) / cnt
    return mu, nu, dmu.reshape(conv.weight.shape), dnu.reshape(conv.weight.shape), conv.weight.detach().clone()


def test_cross_iteration_bn_matches_paper_equations():
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1, dtype=D)
    cbn = normlab.CrossIterationBatchNorm(conv, window=3, burnin=1)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5), cbn.bias.uniform_(-0.5, 0.5)
    opt = torch.optim.SGD(cbn.parameters(), lr=0.05)
    hist = []
    rm, rv = torch.zeros(3, dtype=D), torch.ones(3, dtype=D)
    for step in range(5):
        x = torch.randn(2, 2, 5, 5, dtype=D) + 0.2 * step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out = cbn(xa)
        y = TF.conv2d(xb, conv.weight.detach(), conv.bias.detach(), padding=1)
        mu_t, nu_t = y.mean((0, 2, 3)), (y * y).mean((0, 2, 3))
        mus, nus = [mu_t], [nu_t]
        if step >= 1:  # burn-in of one iteration: plain BN before
            for mu, nu, dmu, dnu, w_then in hist[-2:]:
                delta = conv.weight.detach() - w_then
                mus.append(mu + (dmu * delta).flatten(1).sum(1))
                nus.append(nu + (dnu * delta).flatten(1).sum(1))
        mu_s, nu_s = torch.stack(mus), torch.stack(nus)
        m = mu_s.mean(0)
        var = torch.maximum(nu_s, mu_s**2).mean(0) - m**2
        ref = cbn.weight.detach().reshape(1, -1, 1, 1) * (y - m.reshape(1, -1, 1, 1)) / torch.sqrt(
            var.reshape(1, -1, 1, 1) + cbn.eps) + cbn.bias.detach().reshape(1, -1, 1, 1)
        torch.testing.assert_close(out, ref)
        g = torch.randn_like(out)
        out.backward(g)
        ref.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad)
        n = y.numel() // 3
        rm = 0.9 * rm + 0.1 * mu_t.detach()
        rv = 0.9 * rv + 0.1 * (nu_t - mu_t**2).detach() * n / (n - 1)
        torch.testing.assert_close(cbn.running_mean, rm)
        torch.testing.assert_close(cbn.running_var, rv)
        hist.append(_mu_nu_and_derivatives(conv, x))
        opt.step()
        opt.zero_grad()
    cbn.eval()
    x = torch.randn(1, 2, 5, 5, dtype=D)
    y = TF.conv2d(x, conv.weight, conv.bias, padding=1)
    torch.testing.assert_close(cbn(x), TF.batch_norm(y, rm, rv, cbn.weight, cbn.bias, False, 0.0, cbn.eps))


def test_convert_cbn_pairs_and_unwraps():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.BatchNorm2d(4))
    with torch.no_grad():
        model[1].weight.fill_(2.0)
    normlab.convert(model, "cbn:2")
    assert isinstance(model[0], normlab.CrossIterationBatchNorm) and model[0].window == 2
    assert isinstance(model[1], nn.Identity) and torch.equal(model[0].weight, torch.full((8,), 2.0))
    for _ in range(3):
        model(torch.randn(2, 3, 8, 8)).sum().backward()
    normlab.convert(model, "gn:4")  # back: the convolution stays, its norm becomes the spec
    assert isinstance(model[0][0], nn.Conv2d) and isinstance(model[0][1], normlab.GroupNorm)
    model(torch.randn(1, 3, 8, 8))


def test_convert_cbn_refuses_unpaired_norms_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 36, 4), nn.LayerNorm(4))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"none for 4 \(model left unchanged\)"):
        normlab.convert(model, "cbn:4")
    assert isinstance(model[1], nn.BatchNorm2d) and model.state_dict().keys() == before.keys()
    with pytest.raises(ValueError, match="make_norm cannot build it"):
        normlab.make_norm("cbn:4", 8)
    with pytest.raises(TypeError, match="CrossIterationBatchNorm: expected a Conv"):
        normlab.CrossIterationBatchNorm(nn.Linear(3, 3))
    cbn = normlab.CrossIterationBatchNorm(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match=r"CrossIterationBatchNorm\(8\)"):
        cbn(torch.randn(1, 3, 3, 3))  # a 1x1 output of one sample: no batch statistics


def test_cross_iteration_bn_state_dict_round_trip_and_window_one_is_batch_norm():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, dtype=D)
    cbn = normlab.CrossIterationBatchNorm(copy.deepcopy(conv), window=1)
    ref = nn.Sequential(copy.deepcopy(conv), nn.BatchNorm2d(4, dtype=D))
    for _ in range(2):
        x = torch.randn(2, 3, 6, 6, dtype=D)
        torch.testing.assert_close(cbn(x), ref(x))
    torch.testing.assert_close(cbn.running_var, ref[1].running_var)
    other = normlab.CrossIterationBatchNorm(nn.Conv2d(3, 4, 3, dtype=D), window=1)
    other.load_state_dict(cbn.state_dict())
    cbn.eval(), other.eval()
    x = torch.randn(1, 3, 6, 6, dtype=D)
    torch.testing.assert_close(other(x), cbn(x))
