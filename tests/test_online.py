"""Online normalization (Chiley et al. 2019) against a step-by-step float64 implementation of
the paper's forward and backward (control-process) recurrences written out below."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab
from normlab import OnlineNorm
from normlab import functional as F

from conftest import assert_close


# ------------------------------------------------------------------ float64 reference
class RefOnline:
    """The paper's recurrences, one sample and one channel at a time. x: (N, C, S)."""

    def __init__(self, C, af, ab, eps, m=None, s2=None, u=None, v=None):
        self.af, self.ab, self.eps = af, ab, eps
        self.m = np.zeros(C) if m is None else np.array(m, dtype=np.float64)
        self.s2 = np.ones(C) if s2 is None else np.array(s2, dtype=np.float64)
        self.u = np.zeros(C) if u is None else np.array(u, dtype=np.float64)
        self.v = np.zeros(C) if v is None else np.array(v, dtype=np.float64)

    def forward(self, x):
        x = np.asarray(x, dtype=np.float64)
        N, C, _ = x.shape
        y, scale = np.empty_like(x), np.empty((N, C))
        af = self.af
        for t in range(N):
            for c in range(C):
                mu_x = x[t, c].mean()
                var_x = ((x[t, c] - mu_x) ** 2).mean()
                scale[t, c] = np.sqrt(self.s2[c] + self.eps)
                y[t, c] = (x[t, c] - self.m[c]) / scale[t, c]
                self.s2[c] = af * self.s2[c] + (1 - af) * var_x + af * (1 - af) * (mu_x - self.m[c]) ** 2
                self.m[c] = af * self.m[c] + (1 - af) * mu_x
        self.cache = (y, scale)
        return y

    def backward(self, g):
        g = np.asarray(g, dtype=np.float64)
        y, scale = self.cache
        N, C, _ = g.shape
        dx = np.empty_like(g)
        b = 1 - self.ab
        for t in range(N):
            for c in range(C):
                gt = g[t, c] - b * self.v[c] * y[t, c]
                self.v[c] += (gt * y[t, c]).mean()
                dx[t, c] = gt / scale[t, c] - b * self.u[c]
                self.u[c] += dx[t, c].mean()
        return dx


def ref_layer_scaling(z, eps):
    z = np.asarray(z, dtype=np.float64)
    axes = tuple(range(1, z.ndim))
    return z / np.sqrt((z**2).mean(axis=axes, keepdims=True) + eps)


def make(C, **kw):
    kw.setdefault("dtype", torch.float64)
    return OnlineNorm(C, **kw)


def set_state(layer, rng):
    C = layer.num_features
    with torch.no_grad():
        layer.stream_mean.copy_(torch.from_numpy(rng.normal(size=C)))
        layer.stream_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, size=C)))
        layer.control_u.copy_(torch.from_numpy(rng.normal(size=C)))
        layer.control_v.copy_(torch.from_numpy(rng.normal(size=C)))
    return RefOnline(C, layer.alpha_fwd, layer.alpha_bkw, layer.eps, layer.stream_mean.numpy(),
                     layer.stream_var.numpy(), layer.control_u.numpy(), layer.control_v.numpy())


def check_state(layer, ref):
    assert_close(layer.stream_mean, ref.m, rtol=1e-10, atol=1e-10)
    assert_close(layer.stream_var, ref.s2, rtol=1e-10, atol=1e-10)
    assert_close(layer.control_u, ref.u, rtol=1e-10, atol=1e-10)
    assert_close(layer.control_v, ref.v, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ the core recurrences
@pytest.mark.parametrize("shape", [(6, 3, 4, 5), (7, 4), (5, 2, 9)])
def test_forward_and_control_backward_match_reference_across_batches(shape):
    rng = np.random.default_rng(1)
    C = shape[1]
    layer = make(C, alpha_fwd=0.8, alpha_bkw=0.7, affine=False, ecm=None)
    ref = set_state(layer, rng)
    for batch in range(3):  # the state carries from batch to batch, in both directions
        x = torch.from_numpy(rng.normal(2.0, 3.0, size=shape)).requires_grad_()
        g = torch.from_numpy(rng.normal(size=shape))
        y = layer(x)
        assert_close(y, ref.forward(x.detach().reshape(shape[0], C, -1).numpy()).reshape(shape), rtol=1e-10, atol=1e-10)
        y.backward(g)
        assert_close(x.grad, ref.backward(g.reshape(shape[0], C, -1).numpy()).reshape(shape), rtol=1e-10, atol=1e-10)
        check_state(layer, ref)


def test_channel_last_layout_equals_channel_first():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(5, 3, 6))  # (N, C, L)
    g = rng.normal(size=x.shape)
    first, last = make(3, alpha_fwd=0.9, alpha_bkw=0.8), make(3, alpha_fwd=0.9, alpha_bkw=0.8, channel_dim=-1)
    xf = torch.tensor(x, requires_grad=True)
    xl = torch.tensor(x.transpose(0, 2, 1).copy(), requires_grad=True)  # (N, L, C)
    yf, yl = first(xf), last(xl)
    assert_close(yl.transpose(1, 2), yf, rtol=1e-10, atol=1e-10)
    yf.backward(torch.from_numpy(g))
    yl.backward(torch.from_numpy(g.transpose(0, 2, 1).copy()))
    assert_close(xl.grad.transpose(1, 2), xf.grad, rtol=1e-10, atol=1e-10)
    for name in ("stream_mean", "stream_var", "control_u", "control_v"):
        assert_close(getattr(last, name), getattr(first, name), rtol=1e-12, atol=1e-12)


def test_control_off_is_the_stop_gradient_derivative():
    """alpha_bkw = 1: no feedback, dx = g / sqrt(sigma2_{t-1} + eps), the true gradient of
    the forward with the streamed statistics held constant; u and v just sum their inputs."""
    rng = np.random.default_rng(3)
    layer = make(3, alpha_fwd=0.7, alpha_bkw=1.0, affine=False, ecm=None)
    x = torch.from_numpy(rng.normal(1.0, 2.0, size=(5, 3, 4))).requires_grad_()
    g = torch.from_numpy(rng.normal(size=x.shape))
    ref = RefOnline(3, 0.7, 1.0, layer.eps)
    ref.forward(x.detach().numpy())
    y = layer(x)
    y.backward(g)
    _, scale = ref.cache
    centers = (x.detach().numpy() - y.detach().numpy() * scale[..., None])  # the mu_{t-1} the forward used
    xs = x.detach().clone().requires_grad_()
    ((xs - torch.from_numpy(centers)) / torch.from_numpy(scale[..., None])).backward(g)
    assert_close(x.grad, xs.grad, rtol=1e-12, atol=1e-12)
    assert_close(layer.control_v, (g * y).mean(2).sum(0), rtol=1e-10, atol=1e-10)
    assert_close(layer.control_u, x.grad.mean(2).sum(0), rtol=1e-10, atol=1e-10)


def test_control_process_removes_mean_and_y_components_over_time():
    """u and v are the running sums of mean(dx) and mean(g~ y) (the identity checked first);
    the feedback keeps them bounded, so averaged over many samples the gradient's constant
    component vanishes, where without control (alpha_bkw=1) it stays at mean(g)/sigma."""
    rng = np.random.default_rng(4)
    results = {}
    for ab in (0.9, 1.0):
        layer = make(2, alpha_fwd=0.99, alpha_bkw=ab, affine=False, ecm=None)
        total_dx, total_gy = torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)
        for _ in range(40):
            x = torch.from_numpy(rng.normal(size=(8, 2, 3))).requires_grad_()
            y = layer(x)
            g = 1.0 + 0.5 * y.detach() + torch.from_numpy(rng.normal(size=x.shape))  # offset and y-component
            u0 = layer.control_u.clone()
            y.backward(g)
            assert_close(layer.control_u - u0, x.grad.mean(2).sum(0), rtol=1e-9, atol=1e-9)
            total_dx += x.grad.mean(2).sum(0)
            total_gy += (x.grad * y.detach()).mean(2).sum(0)
        results[ab] = (total_dx / 320, total_gy / 320)
    assert results[0.9][0].abs().max() < 0.05 and results[1.0][0].abs().min() > 0.5
    assert results[0.9][1].abs().max() < 0.05 and results[1.0][1].abs().min() > 0.3


def test_alpha_fwd_one_keeps_the_initial_statistics():
    layer = make(3, alpha_fwd=1.0, affine=False, ecm=None)
    x = torch.randn(4, 3, 5, dtype=torch.float64) * 3 + 2
    assert_close(layer(x), x / np.sqrt(1 + layer.eps), rtol=1e-12, atol=1e-12)
    assert_close(layer.stream_mean, np.zeros(3))
    assert_close(layer.stream_var, np.ones(3))


# ------------------------------------------------------------------ the full layer
def test_default_layer_affine_then_layer_scaling():
    rng = np.random.default_rng(5)
    layer = make(4, alpha_fwd=0.9, alpha_bkw=0.8)
    assert layer.ecm == "ls"
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(rng.uniform(0.5, 1.5, 4)))
        layer.bias.copy_(torch.from_numpy(rng.normal(size=4)))
    ref = RefOnline(4, 0.9, 0.8, layer.eps)
    x = torch.from_numpy(rng.normal(size=(5, 4, 3, 2))).requires_grad_()
    out = layer(x)
    w, b = layer.weight.detach().numpy()[None, :, None], layer.bias.detach().numpy()[None, :, None]
    yr = ref.forward(x.detach().reshape(5, 4, -1).numpy())
    zr = yr * w + b
    outr = ref_layer_scaling(zr, layer.ls_eps)
    assert_close(out, outr.reshape(x.shape), rtol=1e-10, atol=1e-10)
    g = rng.normal(size=(5, 4, 6))
    out.backward(torch.from_numpy(g.reshape(x.shape)))
    # layer scaling's exact backward, then the affine map's, then the control process
    s = np.sqrt((zr**2).mean(axis=(1, 2), keepdims=True) + layer.ls_eps)
    dz = (g - (g * outr).mean(axis=(1, 2), keepdims=True) * outr) / s
    assert_close(layer.weight.grad, (dz * yr).sum((0, 2)), rtol=1e-9, atol=1e-9)
    assert_close(layer.bias.grad, dz.sum((0, 2)), rtol=1e-9, atol=1e-9)
    assert_close(x.grad, ref.backward(dz * w).reshape(x.shape), rtol=1e-9, atol=1e-9)


def test_layer_scaling_backward_is_the_autograd_of_its_formula():
    x = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn_like(x)
    (dx,) = torch.autograd.grad(F.layer_scaling(x, 1e-3), x, g)
    xs = x.detach().clone().requires_grad_()
    (xs / torch.sqrt((xs * xs).mean((1, 2), keepdim=True) + 1e-3)).backward(g)
    assert_close(dx, xs.grad, rtol=1e-12, atol=1e-12)
    assert_close(F.layer_scaling(x, 1e-3), ref_layer_scaling(x.detach().numpy(), 1e-3), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: F.layer_scaling(t, 1e-3), (x[:, :2, :3].detach().clone().requires_grad_(),))


def test_activation_clamp_zero_gradient_at_and_beyond_the_bound():
    x = torch.tensor([[-7.0, -5.0, -4.9, 0.3, 5.0, 6.0]], dtype=torch.float64, requires_grad=True)
    y = F.activation_clamp(x, 5.0)
    assert_close(y, [[-5.0, -5.0, -4.9, 0.3, 5.0, 5.0]])
    y.backward(torch.full_like(x, 2.0))
    assert_close(x.grad, [[0.0, 0.0, 2.0, 2.0, 0.0, 0.0]])
    layer = make(2, ecm="ac", affine=False)
    out = layer(torch.tensor([[100.0, 0.5], [0.1, -100.0]], dtype=torch.float64))
    assert out.abs().max() <= 5.0 and (out.abs() == 5.0).sum() >= 1


def test_batch_of_n_equals_n_batches_of_one():
    """The stream is sample by sample: one batch of N and N batches of 1 (forward then
    backward each) give the same outputs, gradients and final state. Batch size 1 trains."""
    rng = np.random.default_rng(6)
    x = rng.normal(size=(5, 3, 4))
    g = rng.normal(size=x.shape)
    whole, single = make(3, alpha_fwd=0.8, alpha_bkw=0.7), make(3, alpha_fwd=0.8, alpha_bkw=0.7)
    xw = torch.tensor(x, requires_grad=True)
    yw = whole(xw)
    yw.backward(torch.from_numpy(g))
    for t in range(5):
        xt = torch.tensor(x[t : t + 1], requires_grad=True)
        yt = single(xt)
        yt.backward(torch.from_numpy(g[t : t + 1]))
        assert_close(yt, yw[t : t + 1], rtol=1e-10, atol=1e-10)
        assert_close(xt.grad, xw.grad[t : t + 1], rtol=1e-10, atol=1e-10)
    for name in ("stream_mean", "stream_var", "control_u", "control_v"):
        assert_close(getattr(single, name), getattr(whole, name), rtol=1e-10, atol=1e-10)
    dense = make(3)
    dense(torch.randn(1, 3, dtype=torch.float64, requires_grad=True)).sum().backward()  # (1, C) trains


def test_eval_uses_streamed_statistics_and_changes_nothing():
    rng = np.random.default_rng(7)
    layer = make(3, ecm=None)
    set_state(layer, rng)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.1, 0.0, -0.2], dtype=torch.float64))
    layer.eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.from_numpy(rng.normal(size=(4, 3, 5))).requires_grad_()
    out = layer(x)
    m, s2 = layer.stream_mean.numpy()[:, None], layer.stream_var.numpy()[:, None]
    expect = (x.detach().numpy() - m) / np.sqrt(s2 + layer.eps) * np.array([0.5, 1, 2])[:, None] + np.array([0.1, 0, -0.2])[:, None]
    assert_close(out, expect, rtol=1e-12, atol=1e-12)
    out.sum().backward()  # plain autograd of the fixed map; no control state touched
    assert_close(x.grad, np.broadcast_to(np.array([0.5, 1, 2])[:, None] / np.sqrt(s2 + layer.eps), x.shape).copy())
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_eval_with_layer_scaling_is_the_streamed_map_then_a_per_sample_rms(dtype, channels_last):
    """ecm='ls' in eval: y = ls(w (x - mu) / sqrt(s2 + eps) + b), ls(z) = z / sqrt(mean_sample(z^2) + ls_eps),
    written out in numpy, at two sizes, both layouts, three dtypes."""
    rng = np.random.default_rng(11)
    for shape in ((4, 3, 5, 5), (8, 16, 20, 20)):
        c = shape[1]
        layer = OnlineNorm(c, ecm="ls").to(dtype)
        with torch.no_grad():
            layer.stream_mean.copy_(torch.from_numpy(rng.normal(size=c)))
            layer.stream_var.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, size=c)))
            layer.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2.0, size=c)))
            layer.bias.copy_(torch.from_numpy(rng.normal(size=c)))
        layer.eval()
        x = torch.from_numpy(rng.normal(1.0, 2.0, size=shape)).to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            out = layer(x)
        xn = x.double().numpy()
        per_c = lambda t: t.detach().double().numpy()[:, None, None]  # noqa: E731
        z = (xn - per_c(layer.stream_mean)) / np.sqrt(per_c(layer.stream_var) + layer.eps) * per_c(layer.weight) \
            + per_c(layer.bias)
        if dtype == torch.bfloat16:
            z = torch.from_numpy(z).to(dtype).double().numpy()  # (the map's output, rounded as the layer rounds it)
        expect = z / np.sqrt((z * z).mean(axis=(1, 2, 3), keepdims=True) + layer.ls_eps)
        tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
        assert_close(out.double(), expect, rtol=tol, atol=tol)


def test_float32_close_to_float64_and_channels_last():
    rng = np.random.default_rng(8)
    x = rng.normal(3.0, 2.0, size=(6, 4, 5, 5))
    l64, l32 = make(4, alpha_fwd=0.9), OnlineNorm(4, alpha_fwd=0.9)
    x32 = torch.tensor(x, dtype=torch.float32).contiguous(memory_format=torch.channels_last).requires_grad_()
    y64, y32 = l64(torch.tensor(x)), l32(x32)
    assert_close(y32, y64, rtol=1e-4, atol=1e-5)
    y32.sum().backward()
    assert x32.grad.shape == x32.shape and torch.isfinite(x32.grad).all()


def test_state_dict_round_trip():
    rng = np.random.default_rng(9)
    a = make(3, alpha_fwd=0.9, alpha_bkw=0.8)
    for _ in range(2):
        a(torch.from_numpy(rng.normal(size=(4, 3, 2))).requires_grad_()).sum().backward()
    sd = a.state_dict()
    assert set(sd) == {"weight", "bias", "stream_mean", "stream_var", "control_u", "control_v"}
    b = make(3, alpha_fwd=0.9, alpha_bkw=0.8)
    b.load_state_dict(sd)
    x = torch.from_numpy(rng.normal(size=(4, 3, 2)))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    assert torch.equal(ya, yb)
    ya.sum().backward()
    yb.sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(a.control_u, b.control_u) and torch.equal(a.control_v, b.control_v)
    a.reset_stream()
    assert a.stream_var.eq(1).all() and a.stream_mean.eq(0).all() and a.control_u.eq(0).all()


# ------------------------------------------------------------------ errors, registry
@pytest.mark.parametrize(
    "kw, match",
    [({"alpha_fwd": 0.0}, "alpha_fwd"), ({"alpha_fwd": 1.5}, "alpha_fwd"), ({"alpha_bkw": -0.1}, "alpha_bkw"),
     ({"ecm": "bn"}, "ecm"), ({"eps": 0.0}, "eps"), ({"clamp_value": 0.0}, "clamp_value")],
)
def test_bad_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        OnlineNorm(3, **kw)


@pytest.mark.parametrize(
    "x, err, match",
    [(torch.randn(4, 5), ValueError, "expected 3 channels"), (torch.randn(4), ValueError, "rank"),
     (torch.ones(4, 3, dtype=torch.long), TypeError, "floating-point")],
)
def test_bad_inputs_name_the_layer_and_leave_state_unchanged(x, err, match):
    layer = OnlineNorm(3)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    with pytest.raises(err, match=match) as info:
        layer(x)
    assert "OnlineNorm(3)" in str(info.value)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k])


def test_registry_and_convert():
    entry = normlab.registry.get_entry("on")
    assert not entry.batch_stats and entry.applies_to == frozenset({"conv", "dense"})
    assert "Chiley" in entry.paper
    m = normlab.make_norm("on", 8, ecm="ac")
    assert isinstance(m, OnlineNorm) and m.ecm == "ac"
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3), torch.nn.BatchNorm2d(4, eps=1e-3), torch.nn.ReLU())
    model = normlab.convert(model, "on")
    assert isinstance(model[1], OnlineNorm) and model[1].eps == 1e-3
    model(torch.randn(1, 2, 5, 5)).sum().backward()


@pytest.mark.parametrize("use_w, use_b", [(True, False), (False, True)])
def test_functional_partial_affine(use_w, use_b):
    """weight only or bias only: the same as the plain normalization followed by that map,
    forward and backward (input and parameter gradients)."""
    rng = np.random.default_rng(10)
    x = rng.normal(size=(4, 3, 5))
    g = torch.from_numpy(rng.normal(size=x.shape))
    w = torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64, requires_grad=True)
    bvec = torch.tensor([0.1, 0.0, 0.3], dtype=torch.float64, requires_grad=True)

    def buffers():
        return [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
                torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]

    kw = {"alpha_fwd": 0.8, "alpha_bkw": 0.7, "ecm": None}
    xa = torch.tensor(x, requires_grad=True)
    za = F.online_norm(xa, *buffers(), w if use_w else None, bvec if use_b else None, **kw)
    za.backward(g)
    xb = torch.tensor(x, requires_grad=True)
    yb = F.online_norm(xb, *buffers(), **kw)
    ref_w = w.detach().clone().requires_grad_()
    ref_b = bvec.detach().clone().requires_grad_()
    zb = yb * ref_w[:, None] if use_w else yb + ref_b[:, None]
    zb.backward(g)
    assert_close(za, zb, rtol=1e-12, atol=1e-12)
    assert_close(xa.grad, xb.grad, rtol=1e-10, atol=1e-10)
    if use_w:
        assert_close(w.grad, ref_w.grad, rtol=1e-10, atol=1e-10)
    else:
        assert_close(bvec.grad, ref_b.grad, rtol=1e-10, atol=1e-10)


def test_half_precision_input_with_float32_state():
    layer = OnlineNorm(4)
    x = (torch.randn(3, 4, 5) * 2 + 1).to(torch.bfloat16).requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16 and layer.stream_mean.dtype == torch.float32
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    ref = make(4)
    ref(x.detach().double())
    assert_close(layer.stream_mean, ref.stream_mean, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n", [1, 7, 300])  # 300: two blocks of decayed_cumsum
def test_streams_equal_their_recurrences_written_out(n, dtype):
    # decayed_cumsum (cached weights) and control_scan against the step-by-step loops of the
    # forward statistics and the control v, in float64 numpy; two decays in turn (the cache
    # must not mix them), coefficients of control_scan on both sides of 0
    from normlab.functional._online_stream import control_scan, decayed_cumsum

    rng = np.random.default_rng(n)
    first, inc, coef = rng.standard_normal(5), rng.standard_normal((n, 5)), rng.uniform(-1.5, 1.5, (n, 5))
    tol = 1e-12 if dtype == torch.float64 else 1e-4
    for decay in (0.999, 0.5, 0.999):
        before, last = decayed_cumsum(torch.tensor(first, dtype=dtype), torch.tensor(inc, dtype=dtype), decay)
        s, expect = first.copy(), []
        for t in range(n):
            expect.append(s.copy())
            s = decay * s + inc[t]
        assert before.dtype == dtype and before.shape == (n, 5)
        assert_close(before, np.stack(expect), rtol=tol, atol=tol)
        assert_close(last, s, rtol=tol, atol=tol)
    s, expect = first.copy(), []
    for t in range(n):
        expect.append(s.copy())
        s = coef[t] * s + inc[t]
    scale = max(1.0, np.abs(np.stack(expect)).max())
    args = [torch.tensor(a, dtype=dtype) for a in (first, inc, coef)]
    for kernels in (True, False):  # the compiled scan (where built), then the loop of torch ops
        with normlab._kernels.enabled(kernels):
            assert normlab._kernels.scans(*args) == (kernels and normlab._kernels.available())
            before, last = control_scan(*args)
        assert before.dtype == last.dtype == dtype and before.shape == (n, 5) and last.shape == (5,)
        assert_close(before, np.stack(expect), rtol=tol, atol=tol * scale)
        assert_close(last, s, rtol=tol, atol=tol * max(1.0, np.abs(s).max()))
