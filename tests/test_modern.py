"""The norms since 2020 (frn, evob0, evos0, grn, pn, dyt, derf) against float64 references
written here from the papers' equations and the official code's defaults."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import normlab
from normlab import functional as NF

D = torch.float64


# ----------------------------------------------------------------- references (float64)
def _pc(v, nd=4):  # a length-C vector as (1, C, 1, ...)
    return v.reshape(1, -1, *([1] * (nd - 2)))


def _var(x, dims):  # biased variance, written out
    mu = x.mean(dims, keepdim=True)
    return ((x - mu) ** 2).mean(dims, keepdim=True)


def ref_frn(x, m):
    nu2 = (x * x).mean((2, 3), keepdim=True)
    eps = abs(m.eps) + (m.eps_learned.abs() if m.eps_learned is not None else 0)
    y = _pc(m.weight) * x / torch.sqrt(nu2 + eps) + _pc(m.bias)
    return torch.maximum(y, _pc(m.tau)) if m.tau is not None else y


def ref_evob0(x, m, var_b=None):
    var_b = _var(x, (0, 2, 3)) if var_b is None else _pc(var_b)
    right = _pc(m.v) * x + torch.sqrt(_var(x, (2, 3)) + m.eps)
    return x / torch.maximum(torch.sqrt(var_b + m.eps), right) * _pc(m.weight) + _pc(m.bias)


def ref_evos0(x, m):
    n, c, h, w = x.shape
    g = m.num_groups
    var = _var(x.reshape(n, g, c // g, h, w), (2, 3, 4)).expand(n, g, c // g, h, w).reshape(x.shape)
    return x * torch.sigmoid(_pc(m.v) * x) / torch.sqrt(var + m.eps) * _pc(m.weight) + _pc(m.bias)


def ref_grn(x, m):
    gx = torch.sqrt((x * x).sum((2, 3), keepdim=True))
    nx = gx / (gx.mean(1, keepdim=True) + m.eps)
    return _pc(m.weight) * (x * nx) + _pc(m.bias) + x


def ref_dyt(x, m):
    return _pc(m.weight, x.ndim) * torch.tanh(m.alpha * x) + _pc(m.bias, x.ndim)


def ref_derf(x, m):
    return _pc(m.weight, x.ndim) * torch.erf(m.alpha * x + m.shift) + _pc(m.bias, x.ndim)


def _random_params(m: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name in ("weight", "v"):
                p.uniform_(0.5, 1.5)
            elif name == "eps_learned":
                p.fill_(0.3)
            elif name == "alpha":
                p.fill_(0.83)
            elif name == "shift":
                p.fill_(0.31)
            else:
                p.uniform_(-0.5, 0.5)
    return m


CASES = {  # spec -> (reference, layer keywords)
    "frn": (ref_frn, {}),
    "frn-learned-eps": (ref_frn, {"learned_eps": True}),
    "evos0:4": (ref_evos0, {}),
    "grn": (ref_grn, {}),
    "dyt": (ref_dyt, {}),
    "derf": (ref_derf, {}),
    "evob0": (ref_evob0, {}),
}


def _layer(case: str, c: int = 8, **kw) -> nn.Module:
    ref, extra = CASES[case]
    return normlab.make_norm(case.split("-")[0], c, dtype=D, **{**extra, **kw})


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("n", [4, 1])
def test_training_output_and_grads_match_reference(case, n):
    ref, _ = CASES[case]
    m = _random_params(_layer(case))
    x = torch.randn(n, 8, 5, 3, dtype=D) * 2 + 0.3
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    twin = copy.deepcopy(m)
    ya, yb = m(xa), ref(xb, twin)
    torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-9, atol=1e-9)
    for (name, p), q in zip(m.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=f"{case}: grad of {name}")


def test_frn_defaults_and_tlu():
    m = normlab.make_norm("frn", 4)
    assert m.eps == 1e-6 and torch.equal(m.tau, torch.zeros(4)) and torch.equal(m.weight, torch.ones(4))
    x = torch.randn(2, 4, 3, 3, dtype=D)
    y = NF.filter_response_norm(x, tau=torch.full((4,), 0.25, dtype=D))
    assert (y >= 0.25).all()  # the TLU's threshold
    plain = NF.filter_response_norm(x)
    torch.testing.assert_close(plain, x / torch.sqrt((x * x).mean((2, 3), keepdim=True) + 1e-6))


def test_grn_is_identity_at_init_and_channels_last():
    m = normlab.make_norm("grn", 6, dtype=D)
    x = torch.randn(2, 6, 4, 4, dtype=D)
    torch.testing.assert_close(m(x), x)
    _random_params(m)
    last = copy.deepcopy(m)
    last.channel_dim = -1
    torch.testing.assert_close(last(x.movedim(1, -1)), m(x).movedim(1, -1))


def test_evob0_running_variance_and_eval():
    m = _random_params(_layer("evob0"))
    assert m.eps == 1e-3 and m.momentum == 0.1  # timm's defaults
    x = torch.randn(4, 8, 5, 3, dtype=D) * 3
    m(x)
    n = 4 * 5 * 3
    expected = 0.9 * torch.ones(8, dtype=D) + 0.1 * _var(x, (0, 2, 3)).reshape(-1) * n / (n - 1)
    torch.testing.assert_close(m.running_var, expected)
    m.eval()
    rv = m.running_var.clone()
    x2 = torch.randn(3, 8, 5, 3, dtype=D)
    torch.testing.assert_close(m(x2), ref_evob0(x2, m, var_b=rv))
    torch.testing.assert_close(m.running_var, rv)  # eval leaves it alone
    m(x2[:1])  # batch 1 in eval


def test_evos0_same_in_train_and_eval_and_batch_one():
    m = _random_params(_layer("evos0:4", c=12))
    x = torch.randn(1, 12, 3, 3, dtype=D)
    y = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y)
    assert normlab.make_norm("evos0", 64).num_groups == 32


@pytest.mark.parametrize("case", ["dyt", "derf"])
def test_elementwise_init_channel_last_and_rank(case):
    m = normlab.make_norm(case, 6, dtype=D)
    assert m.alpha.shape == (1,) and m.alpha.item() == 0.5
    x = torch.randn(2, 5, 6, dtype=D)
    f = torch.tanh if case == "dyt" else torch.erf
    last = normlab.make_norm(case, 6, dtype=D, channel_dim=-1)
    torch.testing.assert_close(last(x), f(0.5 * x))
    _random_params(last)
    torch.testing.assert_close(last(x), ref_derf(x.movedim(-1, 1), last).movedim(1, -1) if case == "derf"
                               else ref_dyt(x.movedim(-1, 1), last).movedim(1, -1))


def test_dyt_saves_only_its_input():
    m = normlab.make_norm("dyt", 16, channel_dim=-1)
    x = torch.randn(4, 32, 16, requires_grad=True)
    big = []

    def pack(t):
        if t.numel() >= x.numel():
            big.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m(x)
    assert len(big) == 1 and big[0] is x


# --------------------------------------------------------------------------- gradcheck
GRADCHECK = {
    "frn": lambda x, w, b, t, s: NF.filter_response_norm(x, w, b, t, eps=1e-3, learned_eps=s),
    "grn": lambda x, w, b, t, s: NF.global_response_norm(x, w, b),
    "evos0": lambda x, w, b, t, s: NF.evonorm_s0(x, 2, w, b, t),
    "evob0": lambda x, w, b, t, s: NF.evonorm_b0(x, None, w, b, t, training=True),
    "dyt": lambda x, w, b, t, s: NF.dynamic_tanh(x, s, w, b, channel_dim=1),
    "derf": lambda x, w, b, t, s: NF.dynamic_erf(x, s, s * 0.5, w, b, channel_dim=1),
    "pn-eval": lambda x, w, b, t, s: NF.power_norm(x, torch.linspace(0.5, 2, 4, dtype=D), None, w, b, training=False),
}


@pytest.mark.parametrize("name", list(GRADCHECK))
def test_gradcheck(name):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 3, 2, dtype=D, generator=g, requires_grad=True)
    w = (torch.rand(4, dtype=D, generator=g) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=D, generator=g).requires_grad_()
    t = (torch.rand(4, dtype=D, generator=g) * 0.2).requires_grad_()
    s = torch.tensor([0.7], dtype=D, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: GRADCHECK[name](*a), (x, w, b, t, s))


@pytest.mark.parametrize("layout", ["first", "channels_last", "last"])
def test_evonorm_s0_engine_gradcheck(layout):
    # the engine's closed-form backward (EvoS0Stats) against finite differences, every parameter
    from _helpers import graph_nodes

    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 4, 4, 5, dtype=D, generator=g)
    cd = 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "last":
        x, cd = x.movedim(1, -1).contiguous(), -1
    x.requires_grad_()
    w, b, v = (torch.rand(4, dtype=D, generator=g) + 0.5).requires_grad_(), torch.randn(4, dtype=D, generator=g), \
        torch.randn(4, dtype=D, generator=g)
    b.requires_grad_(), v.requires_grad_()
    with NF.fast_path(True):
        assert "EngineNormBackward" in graph_nodes(NF.evonorm_s0(x, 2, w, b, v, channel_dim=cd))
        assert torch.autograd.gradcheck(lambda *a: NF.evonorm_s0(*a[:1], 2, *a[1:], channel_dim=cd), (x, w, b, v))


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("layout", ["first", "channels_last", "last"])
def test_evonorm_b0_engine_gradcheck(layout, training):
    # EvoB0Stats' closed-form backward, batch variance (training) or running variance (eval),
    # with values on both sides of the max (the test checks that both occur)
    from _helpers import graph_nodes

    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 4, 4, 5, dtype=D, generator=g)
    w, b = (torch.rand(4, dtype=D, generator=g) + 0.5), torch.randn(4, dtype=D, generator=g)
    v, rv = torch.tensor([-1.5, -0.3, 0.4, 1.2], dtype=D), torch.rand(4, dtype=D, generator=g) + 0.5
    var_b = rv if not training else _var(x, (0, 2, 3)).reshape(-1)
    right = _pc(v) * x + torch.sqrt(_var(x, (2, 3)) + 1e-3)
    left = torch.sqrt(_pc(var_b) + 1e-3) >= right
    assert 0.1 < left.double().mean() < 0.9
    cd = 1
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "last":
        x, cd = x.movedim(1, -1).contiguous(), -1
    args = [t.requires_grad_() for t in (x, w, b, v)]
    with NF.fast_path(True):
        assert "EngineNormBackward" in graph_nodes(NF.evonorm_b0(x, rv, w, b, v, training=training, channel_dim=cd,
                                                                 momentum=None))
        assert torch.autograd.gradcheck(
            lambda *a: NF.evonorm_b0(a[0], rv, *a[1:], training=training, momentum=None, channel_dim=cd), args)


@pytest.mark.parametrize("name", ["evos0", "evob0"])
def test_evonorm_engine_double_backward(name):
    # create_graph through the engine differentiates the description's reference (the plain function)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 4, 4, 4, dtype=D, generator=g, requires_grad=True)
    w, b, v = (torch.rand(4, dtype=D, generator=g) + 0.5 for _ in range(3))
    f = (lambda x, w, b, v: NF.evonorm_s0(x, 2, w, b, v)) if name == "evos0" else \
        (lambda x, w, b, v: NF.evonorm_b0(x, None, w, b, v))
    with NF.fast_path(True):
        assert torch.autograd.gradgradcheck(f, (x, w.requires_grad_(), b.requires_grad_(), v.requires_grad_()))


# ---------------------------------------------------------------------------- PowerNorm
def test_power_norm_algorithm_1_forward_backward_and_running_statistics():
    m = _random_params(normlab.make_norm("pn", 4, dtype=D))
    w, b = m.weight.detach().clone(), m.bias.detach().clone()
    phi, nu = torch.ones(4, dtype=D), torch.zeros(4, dtype=D)
    alpha = 0.9
    for step in range(3):
        x = (torch.randn(5, 4, 6, dtype=D) * (step + 1)).requires_grad_()
        dy = torch.randn(5, 4, 6, dtype=D)
        y = m(x)
        psi = torch.sqrt(phi + 1e-5).reshape(1, 4, 1)
        x_hat = x.detach() / psi
        torch.testing.assert_close(y, w.reshape(1, 4, 1) * x_hat + b.reshape(1, 4, 1))
        phi = alpha * phi + (1 - alpha) * (x.detach() ** 2).mean((0, 2))
        torch.testing.assert_close(m.running_phi, phi)
        y.backward(dy)
        dx_hat = w.reshape(1, 4, 1) * dy
        dx_tilde = dx_hat - nu.reshape(1, 4, 1) * x_hat
        torch.testing.assert_close(x.grad, dx_tilde / psi)
        nu = nu * (1 - (1 - alpha) * (x_hat**2).mean((0, 2))) + (1 - alpha) * (x_hat * dx_hat).mean((0, 2))
        torch.testing.assert_close(m.ema_gz, nu)
    m.eval()
    x = torch.randn(2, 4, 6, dtype=D)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    torch.testing.assert_close(m(x), w.reshape(1, 4, 1) * x / torch.sqrt(phi + 1e-5).reshape(1, 4, 1)
                               + b.reshape(1, 4, 1))
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("fast", [False, True])
def test_power_norm_first_step_gradient_is_exact(fast):
    # nu starts at 0 and alpha_bkw = 1 keeps it there: the backward is then the true gradient
    # (fast: the engine's closed form, PowerStats, also for the weight and bias)
    phi = torch.rand(4, dtype=D) + 0.5
    x = torch.randn(3, 4, 5, dtype=D, requires_grad=True)
    w = (torch.rand(4, dtype=D) + 0.5).requires_grad_()
    b = torch.randn(4, dtype=D, requires_grad=True)
    with NF.fast_path(fast):
        assert torch.autograd.gradcheck(
            lambda x, w, b: NF.power_norm(x, phi.clone(), torch.zeros(4, dtype=D), w, b, alpha_bkw=1.0), (x, w, b))


def test_power_norm_takes_the_engine_on_large_inputs_only():
    from _helpers import graph_nodes

    m = normlab.make_norm("pn", 64)
    for shape, engine in (((8, 64, 32, 32), True), ((8, 64, 4, 4), False), ((4096, 64), False)):
        y = m(torch.randn(shape, requires_grad=True))
        assert ("EngineNormBackward" in graph_nodes(y)) == engine, shape


def _engine_steps(spec, layout, dtype, fast, steps=3):
    """Three training steps and one eval step of ``spec`` on 6 channels: what each gives (output,
    input and parameter gradients) and the buffers after it."""
    from _helpers import graph_nodes

    torch.manual_seed(0)
    m = _random_params(normlab.make_norm(spec, 6, channel_dim=-1 if layout == "last" else 1))
    m.to(dtype if dtype != torch.bfloat16 else torch.float32)  # half input: float32 parameters (autocast's)
    g = torch.Generator().manual_seed(5)
    out = []
    for step in range(steps + 1):
        x = (torch.randn(4, 6, 5, 7, generator=g) * (step + 1) + 0.4).to(dtype)
        x = x.movedim(1, -1).contiguous() if layout == "last" else \
            x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
        dy = torch.randn(x.shape, generator=g).to(dtype)
        x.requires_grad_()
        m.train(step < steps)
        with NF.fast_path(fast):
            y = m(x)
        if step < steps:
            assert ("EngineNormBackward" in graph_nodes(y)) == fast
        y.backward(dy)
        out += [y, x.grad] + [p.grad.clone() for p in m.parameters()] + [b.clone() for b in m.buffers()]
        m.zero_grad()
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["first", "channels_last", "last"])
@pytest.mark.parametrize("spec", ["pn", "evos0:2", "evob0"])
def test_engine_equals_plain_path(spec, layout, dtype):
    # outputs, input and parameter gradients, buffers (pn: running_phi and ema_gz, its nu; evob0:
    # running_var) after each step, then in eval: the engine's closed forms (PowerStats,
    # EvoS0Stats, EvoB0Stats) against the plain path
    tol = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(_engine_steps(spec, layout, dtype, True), _engine_steps(spec, layout, dtype, False)):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.float().abs().max().item()))


def test_power_norm_engine_double_backward_differentiates_the_plain_path():
    # a gradient penalty: the second pass runs through the same call again (dy = 2y); nu moves once
    w = (torch.rand(4, dtype=D) + 0.5).requires_grad_()
    nu = torch.rand(4, dtype=D)
    got = []
    for fast in (True, False):
        x = torch.randn(3, 4, 5, dtype=D, generator=torch.Generator().manual_seed(2), requires_grad=True)
        ema, phi = nu.clone(), torch.rand(4, dtype=D) * 0 + 1.5
        with NF.fast_path(fast):
            y = NF.power_norm(x, phi, ema, w)
            (dx,) = torch.autograd.grad((y * y).sum(), x, create_graph=True)
            (dw,) = torch.autograd.grad(dx.pow(2).sum(), w)
        got.append((dx.detach(), dw, ema, phi))
    for a, b in zip(*got):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------ state, errors, convert
@pytest.mark.parametrize("spec", ["frn", "evob0", "evos0:4", "grn", "pn", "dyt", "derf"])
def test_state_dict_round_trip(spec):
    a = _random_params(normlab.make_norm(spec, 8))
    x = torch.randn(3, 8, 4, 4)
    a(x)  # moves running statistics where there are any
    b = normlab.make_norm(spec, 8)
    b.load_state_dict(a.state_dict())
    for mode in (False, True):
        a.train(mode), b.train(mode)
        torch.testing.assert_close(b(x), a(x))


@pytest.mark.parametrize("spec", ["frn", "evob0", "evos0:4", "grn", "pn", "dyt", "derf"])
def test_wrong_channels_named(spec):
    m = normlab.make_norm(spec, 8)
    with pytest.raises(ValueError, match=rf"{type(m).__name__}\(8\).*expected 8 channels"):
        m(torch.randn(2, 6, 4, 4))


@pytest.mark.parametrize("spec", ["frn", "evob0", "grn"])
def test_position_axes_required(spec):
    m = normlab.make_norm(spec, 8)
    with pytest.raises(ValueError, match=type(m).__name__):
        m(torch.randn(4, 8))


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"EvoNormS0\(12\).*num_groups"):
        normlab.make_norm("evos0:5", 12)
    with pytest.raises(ValueError, match="dynamic_tanh: alpha"):
        NF.dynamic_tanh(torch.randn(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="PowerNorm: alpha_fwd"):
        normlab.make_norm("pn", 4, alpha_fwd=2.0)
    with pytest.raises(ValueError, match="EvoNormB0: momentum"):
        normlab.make_norm("evob0", 4, momentum=None)


def test_new_specs_are_listed_with_their_papers():
    entries = {e.name: e for e in normlab.describe_norms()}
    for name, arxiv in [("frn", "1911.09737"), ("evob0", "2004.02967"), ("evos0", "2004.02967"),
                        ("grn", "2301.00808"), ("pn", "2003.07845"), ("dyt", "2503.10622"), ("derf", "2512.10938")]:
        assert arxiv in entries[name].paper


@pytest.mark.parametrize("spec", ["dyt", "derf"])
def test_convert_transformer_layer_norms(spec):
    model = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
    normlab.convert(model, spec)
    assert isinstance(model.norm1, (normlab.DynamicTanh, normlab.DynamicErf)) and model.norm1.channel_dim == -1
    x = torch.randn(2, 5, 16)
    model.eval()
    with torch.no_grad():
        out = model(x)
    assert out.shape == x.shape and torch.isfinite(out).all()
    back = normlab.convert(model, "lnc")
    assert isinstance(back.norm1, normlab.ChannelLayerNorm)


def test_convert_bn_model_to_frn_and_back():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    normlab.convert(model, "frn")
    assert isinstance(model[1], normlab.FilterResponseNorm)
    model(torch.randn(1, 3, 6, 6)).sum().backward()  # batch 1 trains
    normlab.convert(model, "bn")
    assert isinstance(model[1], normlab.BatchNorm)


@pytest.mark.parametrize("spec", ["frn", "evob0", "evos0:4", "grn", "pn", "dyt", "derf"])
def test_channel_last_layout_agrees(spec):
    from _helpers import assert_layouts_agree

    first = _random_params(normlab.make_norm(spec, 8, dtype=D))
    last = copy.deepcopy(first)
    assert_layouts_agree(first, last, lambda: torch.randn(3, 8, 4, 5, dtype=D) + 0.5)


def test_power_norm_trains_in_channels_last_sequences():
    m = normlab.make_norm("pn", 16, channel_dim=-1)
    x = torch.randn(4, 10, 16, requires_grad=True)
    m(x).sum().backward()
    assert m.ema_gz.abs().sum() > 0 and x.grad.shape == x.shape


@pytest.mark.parametrize("spec", ["frn", "evob0", "evos0:4", "grn", "pn", "dyt", "derf"])
def test_convert_to_and_from_each_spec(spec):
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    normlab.convert(model, spec)
    cls = type(normlab.make_norm(spec, 8))
    assert isinstance(model[1], cls) and isinstance(model[4], cls)
    model(torch.randn(2, 3, 7, 7)).sum().backward()
    normlab.convert(model, "bn")
    assert isinstance(model[1], normlab.BatchNorm) and isinstance(model[4], normlab.BatchNorm)
    model.eval()
    assert model(torch.randn(1, 3, 7, 7)).shape == (1, 8, 3, 3)


@pytest.mark.parametrize("spec", ["evob0", "evos0:4"])
def test_evonorm_without_nonlinearity_is_the_affine_map(spec):
    m = _random_params(normlab.make_norm(spec, 8, apply_act=False, dtype=D))
    assert m.v is None
    x = torch.randn(2, 8, 3, 3, dtype=D)
    torch.testing.assert_close(m(x), _pc(m.weight) * x + _pc(m.bias))
    if spec == "evob0":
        assert torch.equal(m.running_var, torch.ones(8, dtype=D))  # as timm: no statistics, no update


def test_dyt_float32_within_rounding_of_torch_tanh():
    # computed as 2 * sigmoid(2z) - 1: |error| <= 1.8e-7 on tanh (torch.tanh: 6e-8), then times w (<= 1.5)
    x = torch.randn(64, 33, 16) * 4
    m = _random_params(normlab.make_norm("dyt", 16, channel_dim=-1))
    ref = m.weight.detach() * torch.tanh(m.alpha.detach() * x.double()).float() + m.bias.detach()
    torch.testing.assert_close(m(x), ref, rtol=0, atol=6e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["first", "channels_last"])
@pytest.mark.parametrize("spec", ["evos0:2", "evob0"])
def test_evonorm_engine_parameter_gradients_without_input_gradient(spec, layout, dtype):
    # an input that needs no gradient: the engine's sums pass runs without the input-gradient
    # buffer (its own loop in evonorm_impl.h); the parameters' gradients equal the plain path's
    from _helpers import graph_nodes

    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 6, 5, 7, generator=g) + 0.4).to(dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    dy = torch.randn(x.shape, generator=g).to(dtype)
    grads = []
    for fast in (True, False):
        torch.manual_seed(0)
        m = _random_params(normlab.make_norm(spec, 6))
        with NF.fast_path(fast):
            y = m(x)
        assert ("EngineNormBackward" in graph_nodes(y)) == fast
        y.backward(dy)
        grads.append([p.grad for p in m.parameters()])
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[dtype]
    for a, b in zip(*grads):
        torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.float().abs().max().item()))
