"""Mean-only batch norm (Salimans & Kingma 2016) and batch renormalization (Ioffe 2017).

References are float64 numpy computations written from the papers' equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from _helpers import assert_channels_last_preserved, assert_layouts_agree
from normlab import functional as NF

AXES = (0, 2, 3)  # batch-statistic axes of an (N, C, H, W) input


def _x(shape=(4, 3, 5, 6), scale=(0.5, 1.0, 3.0), shift=(-2.0, 0.0, 4.0), dtype=torch.float64) -> torch.Tensor:
    c = shape[1]
    s = torch.tensor(scale[:c], dtype=dtype).view(1, c, *[1] * (len(shape) - 2))
    b = torch.tensor(shift[:c], dtype=dtype).view(1, c, *[1] * (len(shape) - 2))
    return torch.randn(shape, dtype=dtype) * s + b


def _pc(v, ndim=4) -> np.ndarray:
    return np.asarray(v, dtype=np.float64).reshape([1, -1] + [1] * (ndim - 2))


# ============================================================== mean-only batch norm
def test_mobn_train_matches_paper_and_running_mean():
    layer = normlab.MeanOnlyBatchNorm(3).double()
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([0.5, -1.0, 2.0]))
    running = np.zeros(3)
    for _ in range(3):
        x = _x()
        y = layer(x)
        xn = x.numpy()
        mu = xn.mean(axis=AXES)
        expected = xn - _pc(mu) + _pc([0.5, -1.0, 2.0])
        np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-12, atol=1e-12)
        running = 0.9 * running + 0.1 * mu  # the official code's 0.9 * avg + 0.1 * mu
        np.testing.assert_allclose(layer.running_mean.numpy(), running, rtol=1e-12, atol=1e-12)
    assert int(layer.num_batches_tracked) == 3
    assert layer.weight is None and layer.running_var is None


def test_mobn_backward_centres_gradients():
    # paper: grad_t = grad_t~ - mean(grad_t~), per channel over batch and positions
    layer = normlab.MeanOnlyBatchNorm(3).double()
    x = _x().requires_grad_()
    dy = torch.randn_like(x)
    layer(x).backward(dy)
    d = dy.numpy()
    np.testing.assert_allclose(x.grad.numpy(), d - _pc(d.mean(axis=AXES)), atol=1e-12)
    np.testing.assert_allclose(layer.bias.grad.numpy(), d.sum(axis=AXES), atol=1e-10)


def test_mobn_eval_uses_running_mean():
    layer = normlab.MeanOnlyBatchNorm(3).double()
    for _ in range(4):
        layer(_x())
    layer.eval()
    x = _x(shape=(2, 3, 4, 4))
    before = layer.running_mean.clone()
    y = layer(x)
    expected = x.numpy() - _pc(before.numpy()) + _pc(layer.bias.detach().numpy())
    np.testing.assert_allclose(y.detach().numpy(), expected, atol=1e-12)
    assert torch.equal(layer.running_mean, before)
    # eval with one sample is fine (no batch statistics)
    assert layer(x[:1, :, :1, :1]).shape == (1, 3, 1, 1)


def test_mobn_gradcheck():
    x = _x(shape=(3, 2, 3, 2)).requires_grad_()
    bias = torch.randn(2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: NF.mean_only_batch_norm(x, None, b), (x, bias))


def test_mobn_state_dict_round_trip():
    a = normlab.MeanOnlyBatchNorm(3)
    with torch.no_grad():
        a.bias.normal_()
    for _ in range(2):
        a(_x(dtype=torch.float32))
    sd = a.state_dict()
    assert set(sd) == {"bias", "running_mean", "num_batches_tracked"}
    b = normlab.MeanOnlyBatchNorm(3)
    b.load_state_dict(sd)
    a.eval(), b.eval()
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
    b.reset_running_stats()
    assert torch.all(b.running_mean == 0) and int(b.num_batches_tracked) == 0


def test_mobn_bad_inputs_leave_state_unchanged():
    layer = normlab.MeanOnlyBatchNorm(3)
    layer(_x(dtype=torch.float32))
    mean, n = layer.running_mean.clone(), layer.num_batches_tracked.clone()
    with pytest.raises(ValueError, match=r"MeanOnlyBatchNorm\(3\).*expected 3 channels.*got 4"):
        layer(torch.randn(2, 4, 3, 3))
    with pytest.raises(ValueError, match=r"MeanOnlyBatchNorm\(3\).*more than one value"):
        layer(torch.randn(1, 3))
    with pytest.raises(TypeError, match=r"MeanOnlyBatchNorm\(3\).*floating-point"):
        layer(torch.ones(2, 3, dtype=torch.long))
    assert torch.equal(layer.running_mean, mean) and torch.equal(layer.num_batches_tracked, n)


# ============================================================== batch renormalization
def _brn_reference(xs, gamma, beta, r_max, d_max, alpha, eps):
    """Ioffe 2017, Algorithm 1, step by step in float64: outputs and the running mu, sigma."""
    c = xs[0].shape[1]
    mu, sigma = np.zeros(c), np.sqrt(np.ones(c) + eps)  # the layer starts at running_var = 1
    outs, clipped = [], []
    for x in xs:
        mu_b = x.mean(axis=AXES)
        sigma_b = np.sqrt(((x - _pc(mu_b)) ** 2).mean(axis=AXES) + eps)
        r = np.clip(sigma_b / sigma, 1 / r_max, r_max)
        d = np.clip((mu_b - mu) / sigma, -d_max, d_max)
        clipped.append((r != sigma_b / sigma) | (d != (mu_b - mu) / sigma))
        x_hat = (x - _pc(mu_b)) / _pc(sigma_b) * _pc(r) + _pc(d)
        outs.append(_pc(gamma) * x_hat + _pc(beta))
        mu = mu + alpha * (mu_b - mu)
        sigma = sigma + alpha * (sigma_b - sigma)
    return outs, mu, sigma, np.array(clipped)


def test_brn_train_matches_algorithm_1():
    eps, alpha, r_max, d_max = 1e-3, 0.3, 1.5, 0.7
    layer = normlab.BatchRenorm(3, eps=eps, momentum=alpha, r_max=r_max, d_max=d_max, warmup_steps=0,
                                ramp_steps=0).double()
    gamma, beta = np.array([1.5, 0.5, -1.0]), np.array([0.1, 0.2, 0.3])
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(gamma))
        layer.bias.copy_(torch.from_numpy(beta))
    xs = [_x() for _ in range(4)]
    outs, mu, sigma, clipped = _brn_reference([x.numpy() for x in xs], gamma, beta, r_max, d_max, alpha, eps)
    for x, expected in zip(xs, outs):
        np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(layer.running_mean.numpy(), mu, rtol=1e-12)
    # running_var stores sigma^2 - eps, so sqrt(running_var + eps) is the running std
    np.testing.assert_allclose(np.sqrt(layer.running_var.numpy() + eps), sigma, rtol=1e-12)
    # some channels clipped, some not: the test exercises both sides of the clip
    assert clipped.any() and not clipped.all()

    # eval: gamma * (x - mu) / sigma + beta
    layer.eval()
    x = _x(shape=(2, 3, 4, 4))
    expected = _pc(gamma) * (x.numpy() - _pc(mu)) / _pc(sigma) + _pc(beta)
    np.testing.assert_allclose(layer(x).detach().numpy(), expected, rtol=1e-10, atol=1e-10)


def test_brn_backward_is_the_papers_with_r_d_constant():
    eps = 1e-5
    x = _x().requires_grad_()
    rm, rv = torch.tensor([-1.5, 0.2, 3.5], dtype=torch.float64), torch.tensor([0.5, 1.5, 6.0], dtype=torch.float64)
    gamma = torch.tensor([1.5, 0.5, -1.0], dtype=torch.float64, requires_grad=True)
    beta = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    y = NF.batch_renorm(x, rm.clone(), rv.clone(), gamma, beta, momentum=None, r_max=3.0, d_max=5.0, eps=eps)
    dy = torch.randn_like(y)
    y.backward(dy)

    xn, g, m = x.detach().numpy(), dy.numpy(), x.numel() // 3
    mu_b = xn.mean(axis=AXES)
    sigma_b = np.sqrt(((xn - _pc(mu_b)) ** 2).mean(axis=AXES) + eps)
    sigma = np.sqrt(rv.numpy() + eps)
    r = np.clip(sigma_b / sigma, 1 / 3, 3)
    d = np.clip((mu_b - rm.numpy()) / sigma, -5, 5)
    assert np.all(np.abs(r - sigma_b / sigma) < 1e-12) and np.all(r != 1)  # unclipped, not batch norm
    # Ioffe 2017, sec. 3: backward through x_hat = (x - mu_B) / sigma_B * r + d with r, d constant
    dxh = g * _pc(gamma.detach().numpy())
    d_sigma_b = (dxh * (xn - _pc(mu_b))).sum(axis=AXES) * (-r / sigma_b**2)
    d_mu_b = dxh.sum(axis=AXES) * (-r / sigma_b)
    dx = dxh * _pc(r / sigma_b) + _pc(d_sigma_b) * (xn - _pc(mu_b)) / (m * _pc(sigma_b)) + _pc(d_mu_b) / m
    np.testing.assert_allclose(x.grad.numpy(), dx, rtol=1e-9, atol=1e-10)
    x_hat = (xn - _pc(mu_b)) / _pc(sigma_b) * _pc(r) + _pc(d)
    np.testing.assert_allclose(gamma.grad.numpy(), (g * x_hat).sum(axis=AXES), rtol=1e-9)
    np.testing.assert_allclose(beta.grad.numpy(), g.sum(axis=AXES), rtol=1e-9)


@pytest.mark.parametrize("via", ["limits", "warmup"])
def test_brn_with_r1_d0_is_batch_norm(via):
    kw = dict(r_max=1.0, d_max=0.0, warmup_steps=0, ramp_steps=0) if via == "limits" else {}
    brn = normlab.BatchRenorm(3, momentum=0.1, **kw).double()  # default schedule: still in warmup
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        for m in (brn, bn):
            m.weight.copy_(torch.tensor([1.5, 0.5, -1.0]))
            m.bias.copy_(torch.tensor([0.1, 0.2, 0.3]))
    for _ in range(3):  # after the first step the running stats differ from the batch's
        x = _x()
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = brn(xa), bn(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-12, atol=1e-12)
        dy = torch.randn_like(ya)
        ya.backward(dy), yb.backward(dy)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(brn.weight.grad, bn.weight.grad)
    torch.testing.assert_close(brn.bias.grad, bn.bias.grad)


def test_brn_schedule():
    lim = lambda s, **kw: tuple(float(v) for v in NF.batch_renorm_limits(s, 3.0, 5.0, **kw))  # noqa: E731
    for s in range(6):  # held at batch norm through the warmup (and at its last edge)
        assert lim(s, warmup_steps=5, ramp_steps=10) == (1.0, 0.0)
    assert lim(10, warmup_steps=5, ramp_steps=10) == pytest.approx((2.0, 2.5))
    assert lim(15, warmup_steps=5, ramp_steps=10) == (3.0, 5.0)
    assert lim(10**6, warmup_steps=5, ramp_steps=10) == (3.0, 5.0)
    assert lim(0, warmup_steps=0, ramp_steps=0) == (3.0, 5.0)  # both 0: final limits at once
    assert lim(4, warmup_steps=5, ramp_steps=0) == (1.0, 0.0) and lim(5, warmup_steps=5, ramp_steps=0) == (3.0, 5.0)
    # the paper's Inception run: r_max 3 at 40k, d_max 5 at 25k, after 5k steps of batch norm
    paper = dict(warmup_steps=5000, ramp_steps=(35000, 20000))
    assert lim(25000, **paper) == pytest.approx((1 + 2 * 20 / 35, 5.0))
    assert lim(40000, **paper) == (3.0, 5.0)

    # the layer follows num_batches_tracked: two steps of batch norm, then the final limits
    layer = normlab.BatchRenorm(3, momentum=0.5, r_max=1.2, d_max=0.1, warmup_steps=2, ramp_steps=0).double()
    bn = nn.BatchNorm2d(3, momentum=0.5).double()
    for step in range(3):
        assert [float(v) for v in layer.limits()] == ([1.0, 0.0] if step < 2 else [1.2, 0.1])
        x = _x()
        same = torch.allclose(layer(x), bn(x), atol=1e-9)
        assert same == (step < 2)


def test_brn_gradcheck():
    # r and d are constants in backward, so gradcheck's numerical derivative agrees where
    # they are clipped (locally constant): running stats far from the batch's, or r_max=1, d_max=0
    x = _x(shape=(3, 2, 3, 2))[:, :2].contiguous().requires_grad_()
    w = torch.tensor([1.3, -0.7], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([0.2, 0.1], dtype=torch.float64, requires_grad=True)
    far_mean, far_var = torch.tensor([500.0, -500.0], dtype=torch.float64), torch.tensor([1e4, 1e-4], dtype=torch.float64)
    near_mean, near_var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    for rm, rv, r_max, d_max in [(far_mean, far_var, 2.0, 1.0), (near_mean, near_var, 1.0, 0.0)]:
        def f(x, w, b, rm=rm, rv=rv, r_max=r_max, d_max=d_max):
            return NF.batch_renorm(x, rm, rv, w, b, momentum=None, r_max=r_max, d_max=d_max)
        assert torch.autograd.gradcheck(f, (x, w, b))


def test_brn_loads_torch_batchnorm_state_and_evaluates_the_same():
    bn = nn.BatchNorm2d(3)
    for _ in range(3):
        bn(_x(dtype=torch.float32))
    brn = normlab.BatchRenorm(3)
    brn.load_state_dict(bn.state_dict())
    bn.eval(), brn.eval()
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(brn(x), bn(x))


def test_brn_state_dict_round_trip_and_schedule_state():
    a = normlab.BatchRenorm(3, warmup_steps=1, ramp_steps=3)
    for _ in range(3):
        a(_x(dtype=torch.float32))
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    b = normlab.BatchRenorm(3, warmup_steps=1, ramp_steps=3)
    b.load_state_dict(sd)
    assert [float(v) for v in b.limits()] == [float(v) for v in a.limits()]
    x = _x(dtype=torch.float32)
    torch.testing.assert_close(a(x), b(x))  # training: same r, d from the same state
    a.eval(), b.eval()
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_brn_bad_arguments_and_inputs():
    for kw, msg in [(dict(r_max=0.5), "r_max must be >= 1"), (dict(d_max=-1.0), "d_max must be >= 0"),
                    (dict(warmup_steps=-1), "warmup_steps"), (dict(ramp_steps=(1, 2, 3)), "ramp_steps"),
                    (dict(ramp_steps=1.5), "ramp_steps"), (dict(track_running_stats=False), "running statistics"),
                    (dict(momentum=2.0), "momentum")]:
        with pytest.raises(ValueError, match=r"BatchRenorm(\(3\))?: .*" + msg):
            normlab.BatchRenorm(3, **kw)
    layer = normlab.BatchRenorm(3)
    layer(_x(dtype=torch.float32))
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(ValueError, match=r"BatchRenorm\(3\).*expected 3 channels.*got 2"):
        layer(torch.randn(4, 2, 3))
    with pytest.raises(ValueError, match=r"BatchRenorm\(3\).*rank >= 2"):
        layer(torch.randn(3))
    with pytest.raises(ValueError, match=r"BatchRenorm\(3\).*more than one value"):
        layer(torch.randn(1, 3))
    for k, v in layer.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match="needs running_mean and running_var"):
        NF.batch_renorm(torch.randn(4, 3), None, None)


# ============================================================== shared: layout, conversion
LAYERS = {
    "mobn": lambda: normlab.MeanOnlyBatchNorm(3),
    "brn": lambda: normlab.BatchRenorm(3, momentum=0.2, r_max=1.5, d_max=0.5, warmup_steps=1, ramp_steps=0),
}


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_channel_dim_last_equals_channel_first(name):
    assert_layouts_agree(LAYERS[name](), LAYERS[name](), lambda: _x(dtype=torch.float32), steps=3)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_channels_last_memory_preserved(name):
    assert_channels_last_preserved(LAYERS[name](), LAYERS[name](), _x(dtype=torch.float32))


@pytest.mark.parametrize("spec", ["mobn", "brn"])
def test_convert_and_recalibrate(spec):
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm1d(3))
    model[4] = nn.BatchNorm2d(3)
    with torch.no_grad():
        model[1].running_mean.fill_(0.25)
    normlab.convert(model, spec)
    kind = normlab.MeanOnlyBatchNorm if spec == "mobn" else normlab.BatchRenorm
    assert isinstance(model[1], kind) and isinstance(model[4], kind)
    assert torch.all(model[1].running_mean == 0.25)  # running statistics carried over
    x = torch.randn(4, 2, 6, 6)
    model(x).sum().backward()
    model.eval()
    assert model(x).shape == (4, 3, 4, 4)
    # recalibrate: the cumulative average of the batch means (equal-size batches)
    batches = [torch.randn(4, 2, 6, 6) + i for i in range(3)]
    normlab.recalibrate(model, batches)
    with torch.no_grad():
        means = [model[0](b).double().mean(dim=AXES) for b in batches]
    torch.testing.assert_close(model[1].running_mean.double(), torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    assert not model.training
