"""Norm + activation (``make_norm(spec, C, act=...)``): ReLU, leaky ReLU, SiLU and exact GELU
run in the engine's output pass (and their derivative in its backward passes, from the saved
input). Checked against torch's own layers followed by torch's activation
(an independent reference), train and eval, both layouts, and for memory."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as TF

import normlab
from normlab import _kernels
from normlab.bench import saved_bytes

from _helpers import graph_nodes

CL = torch.channels_last
ACTS = {"relu": lambda y: TF.relu(y), "leaky_relu": lambda y: TF.leaky_relu(y, 0.2), "silu": TF.silu,
        "gelu": TF.gelu}


def _torch_layer(spec: str, c: int) -> torch.nn.Module:
    return {"bn": lambda: torch.nn.BatchNorm2d(c), "gn:2": lambda: torch.nn.GroupNorm(2, c),
            "ln": lambda: torch.nn.GroupNorm(1, c), "in": lambda: torch.nn.GroupNorm(c, c)}[spec]()


@pytest.mark.parametrize("spec", ["bn", "gn:2", "ln", "in"])
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("size", ["small", "large"])
def test_norm_with_activation_equals_torch_then_activation(spec, act, channels_last, size):
    c = 8
    shape = (4, c, 5, 6) if size == "small" else (8, c, 48, 40)  # (the large one takes the engine)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3
    if channels_last:
        x = x.contiguous(memory_format=CL)
    mine = normlab.make_norm(spec, c, act=act, negative_slope=0.2).double()
    ref = _torch_layer(spec, c).double()
    w, b = torch.rand(c, generator=g, dtype=torch.float64) + 0.5, torch.randn(c, generator=g, dtype=torch.float64)
    with torch.no_grad():
        for m in (mine, ref):
            m.weight.copy_(w)
            m.bias.copy_(b)
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    for training in (True, False):
        mine.train(training), ref.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = mine(xa), ACTS[act](ref(xb))
        torch.testing.assert_close(ya, yb, rtol=1e-10, atol=1e-10)
        ga = torch.autograd.grad(ya, (xa, mine.weight, mine.bias), dy)
        gb = torch.autograd.grad(yb, (xb, ref.weight, ref.bias), dy)
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if spec == "bn":
        torch.testing.assert_close(mine.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(mine.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("spec", ["bn", "gn:2", "ln", "in", "rms"])
@pytest.mark.parametrize("act", ["relu", "leaky_relu", "silu", "gelu"])
def test_fused_activation_runs_in_the_engine_and_saves_one_input(spec, act):
    if not _kernels.available():
        pytest.skip(_kernels.status())
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    m = normlab.make_norm(spec, 16, act=act)
    with normlab.functional.fast_path(True):
        y = m(x)
        assert type(y.grad_fn).__name__ == "EngineNormBackward"  # one node: the activation is inside
        nbytes = saved_bytes(lambda: m(x))
    assert nbytes <= x.numel() * 4 + 64 * 8 * 16 * 8  # x, and (N, C) statistics
    with normlab.functional.fast_path(False):  # the plain path: norm, then torch's activation
        want = m(x)
    torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, m.weight), dy)
    ref = torch.autograd.grad(want, (x, m.weight), dy)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_activation_half_precision_output(dtype):
    # the epilogue acts on the float32 normalized value before it is rounded: the output equals
    # relu of a float32 reference rounded once
    if not _kernels.supports(dtype):
        pytest.skip(_kernels.status())
    x = (torch.randn(8, 16, 32, 32) * 3 + 1).to(dtype)
    m = normlab.make_norm("bn", 16, act="relu")
    with normlab.functional.fast_path(True), torch.no_grad():
        y = m(x)
    ref = torch.relu(torch.nn.functional.batch_norm(x.float(), None, None, training=True))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref, rtol=1e-2, atol=1e-2)
    assert (y >= 0).all()


@pytest.mark.parametrize("spec", ["gn:4", "ln", "in", "rms"])
@pytest.mark.parametrize("act", ["silu", "gelu", "leaky_relu"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_per_sample_norm_with_activation_in_the_one_pass_kernels(spec, act, channels_last, dtype, monkeypatch):
    # enough samples for the per-(sample, group) passes from cache, which then apply the
    # activation (SiLU and GELU keep dy' between the backward's two passes): against the float64
    # plain path (the norm, then torch's activation)
    if not _kernels.supports(dtype):
        pytest.skip(_kernels.status())
    from normlab.engine import function

    calls = []
    for name in ("group_forward", "group_backward"):
        real = getattr(function._kernels, name)
        monkeypatch.setattr(function._kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    c = 16
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, c, 40, 36, generator=g) * 1.5 + 0.4
    if channels_last:
        x = x.contiguous(memory_format=CL)
    m = normlab.make_norm(spec, c, act=act, negative_slope=0.1)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g) + 0.5)
        if getattr(m, "bias", None) is not None:
            m.bias.copy_(torch.randn(c, generator=g))
    dy = torch.randn(x.shape, generator=g)
    xa = x.to(dtype).requires_grad_()
    with normlab.functional.fast_path(True):
        y = m(xa)  # (a float32 layer takes bfloat16 input, as under autocast)
        got = torch.autograd.grad(y, (xa, m.weight), dy.to(dtype))
    assert calls == ["group_forward", "group_backward"]
    m64 = copy.deepcopy(m).double()
    xr = xa.detach().double().requires_grad_()
    with normlab.functional.fast_path(False):
        want = m64(xr)
        ref = torch.autograd.grad(want, (xr, m64.weight), dy.double())
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(y.double(), want, rtol=tol, atol=tol)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=tol, atol=tol * 4)
    torch.testing.assert_close(got[1].double(), ref[1], rtol=tol, atol=tol * x.numel() ** 0.5)


@pytest.mark.parametrize("spec", ["bn", "gn:4", "rms"])
def test_half_precision_gelu_and_silu_are_fused(spec):
    # the rule of normlab.engine.fuses: every activation in every dtype (the half types' exact
    # GELU on mathfn.h's division-free nl_gelu_half); both equal the norm then torch's act
    if not _kernels.supports(torch.bfloat16):
        pytest.skip(_kernels.status())
    x = (torch.randn(8, 16, 32, 32) * 2 + 0.5).to(torch.bfloat16).requires_grad_()
    for act in ("gelu", "silu"):
        m = normlab.make_norm(spec, 16, act=act)
        y = m(x)
        assert type(y.grad_fn).__name__ == "EngineNormBackward"
        assert normlab.engine.fuses(act)
        plain = normlab.make_norm(spec, 16)
        plain.load_state_dict(m.state_dict(), strict=False)
        want = ACTS[act](plain(x.detach().float())).to(torch.bfloat16)
        torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)


# the half types' fused activations (GELU on nl_gelu_half, SiLU on nl_expf_half, ReLU) on every
# kernel path, both layouts: outputs and every gradient against the float64 plain path (the
# norm, then torch's activation) on the same rounded input, within the type's rounding
HALF_ACT_TOL = {torch.bfloat16: (8e-3, 3e-2, 2e-3), torch.float16: (1e-3, 4e-3, 2e-3)}  # (output, dx, parameters)
HALF_ACT_CALLS = {"one-pass": ["group_forward", "group_backward"], "generic": ["affine", "reduce", "dx"]}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "silu", "relu"])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("spec, path", [("gn:2", "one-pass"), ("gn:2", "generic"), ("bn", "generic")])
def test_half_precision_fused_activation_equals_the_plain_path(dtype, act, channels_last, spec, path, monkeypatch):
    if not _kernels.supports(dtype):
        pytest.skip(_kernels.status())
    calls = _frn_path(monkeypatch, path)
    c, g = 6, torch.Generator().manual_seed(4)
    x = torch.randn(2 * torch.get_num_threads() + 1, c, 9, 7, generator=g) * 1.5 + 0.4
    dy = torch.randn(x.shape, generator=g)
    if channels_last:
        x, dy = x.contiguous(memory_format=CL), dy.contiguous(memory_format=CL)
    m = normlab.make_norm(spec, c, act=act)
    with torch.no_grad():
        m.weight.copy_(torch.rand(c, generator=g) * 2 + 0.5)  # (normalized values out to about -6)
        m.bias.copy_(torch.randn(c, generator=g) * 0.5)
    xa = x.to(dtype).requires_grad_()
    with normlab.functional.fast_path(True):
        y = m(xa)
        got = torch.autograd.grad(y, (xa, m.weight, m.bias), dy.to(dtype))
    assert calls == HALF_ACT_CALLS[path] and type(y.grad_fn).__name__ == "EngineNormBackward"
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    m64 = copy.deepcopy(m).double()
    xr = xa.detach().double().requires_grad_()
    with normlab.functional.fast_path(False):
        want = m64(xr)
        ref = torch.autograd.grad(want, (xr, m64.weight, m64.bias), dy.to(dtype).double())
    tol_y, tol_dx, tol_p = HALF_ACT_TOL[dtype]
    torch.testing.assert_close(y.double(), want, rtol=tol_y, atol=tol_y)
    torch.testing.assert_close(got[0].double(), ref[0], rtol=tol_dx, atol=tol_dx)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.double(), b, rtol=tol_p, atol=tol_p * x.numel() ** 0.5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu", "silu"])
@pytest.mark.parametrize("spec", ["bn", "gn:4", "rms"])
def test_half_precision_fused_activation_saves_only_the_input(dtype, act, spec):
    if not _kernels.supports(dtype):
        pytest.skip(_kernels.status())
    x = torch.randn(8, 16, 32, 32).to(dtype).requires_grad_()
    m = normlab.make_norm(spec, 16, act=act)
    saved = []
    with normlab.functional.fast_path(True), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    assert type(y.grad_fn).__name__ == "EngineNormBackward"
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0] is x


# ------------------------------------------------------------- FRN's TLU inside the kernels
# filter_response_norm on the engine applies max(y, tau) in the output pass (activation code 4,
# a per-(n, c) threshold) and sums tau's gradient in the backward's sums pass: checked against
# the plain path (torch.maximum), on the one-pass per-sample kernels and on the generic passes

FRN_DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
FRN_TOL = {torch.float64: (1e-10, 1e-10, 1e-10), torch.float32: (1e-5, 1e-5, 1e-4),
           torch.bfloat16: (1e-2, 3e-2, 1e-3), torch.float16: (2e-3, 4e-3, 1e-3)}  # (output, dx, parameters)


def _frn_path(monkeypatch, path: str) -> list:
    """Record which kernels the engine calls; "generic": the one-pass per-sample kernels off."""
    from normlab.engine import function

    calls: list = []
    for name in ("group_forward", "group_backward", "affine", "reduce", "dx"):
        real = getattr(function._kernels, name)
        monkeypatch.setattr(function._kernels, name, lambda *a, _r=real, _n=name, **k: calls.append(_n) or _r(*a, **k))
    if path == "generic":
        monkeypatch.setattr(function, "_fused", lambda *a: None)
    return calls


FRN_CALLS = {"one-pass": ["group_forward", "group_backward"], "generic": ["affine", "reduce", "dx"]}


def _frn_case(dtype, channels_last, seed=3, c=6, hw=(9, 7), zeros=False):
    """x (dtype, enough samples for the one-pass kernels), weight, bias, tau (float64 with float64
    x, else float32: a float32 layer under autocast), dy."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * torch.get_num_threads() + 1
    x = torch.randn(n, c, *hw, generator=g, dtype=torch.float64) * 1.5 + 0.4
    if zeros:
        x[..., ::3] = 0.0
    pdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    b, tau = (torch.randn(c, generator=g, dtype=torch.float64) * 0.5 for _ in range(2))
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    if channels_last:
        x, dy = x.contiguous(memory_format=CL), dy.contiguous(memory_format=CL)
    return x.to(dtype), [t.to(pdt) for t in (w, b, tau)], dy.to(dtype)


def _frn_grads(x, params, dy, fast, create_graph=False):
    xs, ps = x.clone().requires_grad_(), [p.clone().requires_grad_() for p in params]
    with normlab.functional.fast_path(fast):
        y = normlab.functional.filter_response_norm(xs, *ps, eps=1e-3)
        grads = torch.autograd.grad(y, (xs, *ps), dy, create_graph=create_graph)
    return y, grads, xs, ps


def _frn_gap(x, params):
    """FRN before its TLU minus tau, in float64 (the plain path)."""
    with normlab.functional.fast_path(False), torch.no_grad():
        y = normlab.functional.filter_response_norm(x.double(), *(p.double() for p in params[:2]), eps=1e-3)
    return y - params[2].double().view(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", FRN_DTYPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path", ["one-pass", "generic"])
def test_frn_tlu_on_the_engine_equals_the_plain_path(dtype, channels_last, path, monkeypatch):
    if not _kernels.supports(dtype):
        pytest.skip(_kernels.status())
    x, params, dy = _frn_case(dtype, channels_last)
    calls = _frn_path(monkeypatch, path)
    y, got = _frn_grads(x, params, dy, True)[:2]
    assert calls == FRN_CALLS[path] and type(y.grad_fn).__name__ == "EngineNormBackward"
    assert y.dtype == dtype and y.is_contiguous(memory_format=CL if channels_last else torch.contiguous_format)
    want_y, want = _frn_grads(x, params, dy, False)[:2]
    assert "MaximumBackward0" in graph_nodes(want_y)  # (the plain path: torch.maximum)
    assert 0.1 < (_frn_gap(x, params) < 0).double().mean() < 0.9  # both sides of the threshold occur
    tol_y, tol_dx, tol_p = FRN_TOL[dtype]
    torch.testing.assert_close(y, want_y, rtol=tol_y, atol=tol_y)
    torch.testing.assert_close(got[0], want[0], rtol=tol_dx, atol=tol_dx)
    for name, a, b in zip(("weight", "bias", "tau"), got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=tol_p, atol=tol_p, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path", ["one-pass", "generic"])
def test_frn_tlu_ties_split_the_gradient_as_torch_maximum(channels_last, path, monkeypatch):
    # x = 0 and bias = tau: y = tau exactly there (FRN at init: beta = tau = 0, on zero inputs);
    # torch.maximum passes half of dy to each side of a tie, and so do the kernels
    if not _kernels.available():
        pytest.skip(_kernels.status())
    x, (w, b, tau), dy = _frn_case(torch.float64, channels_last, zeros=True)
    params = [w, b, b.clone()]
    calls = _frn_path(monkeypatch, path)
    y, got = _frn_grads(x, params, dy, True)[:2]
    assert calls == FRN_CALLS[path]
    want_y, want = _frn_grads(x, params, dy, False)[:2]
    assert (x == 0).sum() > 0
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    for a, b_ in zip(got, want):
        torch.testing.assert_close(a, b_, rtol=1e-10, atol=1e-10)
    strict = (dy * (want_y <= params[2].view(1, -1, 1, 1))).sum((0, 2, 3))  # all of a tie's dy to tau
    assert (got[3] - strict).abs().max() > 1e-3  # (the ties matter here)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("path", ["one-pass", "generic"])
def test_frn_tlu_engine_gradcheck(channels_last, path, monkeypatch):
    if not _kernels.available():
        pytest.skip(_kernels.status())
    x, params, _ = _frn_case(torch.float64, channels_last, seed=5, c=4, hw=(3, 4))
    gap = _frn_gap(x, params)
    assert gap.abs().min() > 1e-4 and 0.1 < (gap < 0).double().mean() < 0.9  # no tie within the steps
    calls = _frn_path(monkeypatch, path)
    args = [t.clone().requires_grad_() for t in (x, *params)]
    with normlab.functional.fast_path(True):
        assert torch.autograd.gradcheck(lambda *a: normlab.functional.filter_response_norm(*a, eps=1e-3), args)
    assert set(calls) == set(FRN_CALLS[path])


def test_frn_tlu_engine_double_backward_is_the_plain_paths():
    # create_graph through the engine differentiates the reference (the plain FRN, then the TLU)
    if not _kernels.available():
        pytest.skip(_kernels.status())
    x, params, dy = _frn_case(torch.float64, False)
    out = []
    for fast in (True, False):
        y, grads, xs, ps = _frn_grads(x, params, dy, fast, create_graph=True)
        out.append(torch.autograd.grad((grads[0] ** 2).sum() + grads[3].sum(), (xs, *ps), allow_unused=True))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("channels_last", [False, True])
def test_frn_tlu_on_the_engine_saves_one_input_sized_tensor(channels_last):
    if not _kernels.available():
        pytest.skip(_kernels.status())
    x = torch.randn(8, 16, 32, 32)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    m = normlab.make_norm("frn", 16)
    saved = []
    with normlab.functional.fast_path(True), torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t) or t, lambda t: t):
        y = m(x)
    assert type(y.grad_fn).__name__ == "EngineNormBackward"  # the TLU inside: no node after it
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0] is x
    with normlab.functional.fast_path(True):
        assert saved_bytes(lambda: m(x)) <= x.numel() * 4 + 64 * 8 * 16 * 8  # x, and (N, C) statistics


def test_tlu_epilogue_needs_its_threshold():
    with pytest.raises(ValueError, match=r"epilogue\('tlu'\).*threshold"):
        normlab.engine.epilogue("tlu")
    assert normlab.engine.epilogue("tlu", threshold=torch.zeros(3)).code == _kernels.EPILOGUES["tlu"]


MIXED_SPECS = ["mobn", "brn", "bin", "sn", "pn", "grn"]


def _params(m: torch.nn.Module) -> list:
    return [p for p in m.parameters() if p.requires_grad]


@pytest.mark.parametrize("spec", MIXED_SPECS)
@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_batch_and_mixed_norms_fuse_the_activation_as_the_plain_path(spec, act, channels_last, dtype):
    """mobn, brn, bin, sn, pn and grn with ``act=``: one engine node (the activation inside its output
    pass) equal to the plain path (the norm's reference, then torch's activation) in outputs,
    input and parameter gradients and running statistics, over two training steps and eval;
    float64 to 1e-9, bfloat16 against the float64 plain path on the same rounded input."""
    if not _kernels.available():
        pytest.skip(_kernels.status())
    c = 8
    g = torch.Generator().manual_seed(3)
    x64 = torch.randn(4, c, 10, 12, generator=g, dtype=torch.float64) * 2 + 0.3
    mine = normlab.make_norm(spec, c, act=act, negative_slope=0.2)
    with torch.no_grad():
        for p in _params(mine):
            p.copy_(torch.rand(p.shape, generator=g) + 0.5)
    mine = mine.double() if dtype == torch.float64 else mine
    plain = copy.deepcopy(mine).double()
    x = x64.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    if dtype == torch.float64:
        tol_y = tol_dx = tol_p = dict(rtol=1e-9, atol=1e-9)
    else:  # (as the half-precision test above: parameter sums of many rounded terms)
        ty, tdx, tp = HALF_ACT_TOL[dtype]
        tol_y, tol_dx, tol_p = dict(rtol=ty, atol=ty), dict(rtol=tdx, atol=tdx), dict(rtol=tp, atol=tp * x.numel() ** 0.5)
    for training in (True, True, False):
        mine.train(training), plain.train(training)
        xa, xb = x.clone().requires_grad_(), x.double().clone().requires_grad_()
        with normlab.functional.fast_path(True):
            ya = mine(xa)
        with normlab.functional.fast_path(False):
            yb = plain(xb)
        if training:
            assert type(ya.grad_fn).__name__ == "EngineNormBackward"  # the activation is inside
        assert ya.dtype == x.dtype
        torch.testing.assert_close(ya.double(), yb, **tol_y)
        dy = torch.randn(ya.shape, generator=g, dtype=torch.float64).to(dtype).double()
        ga = torch.autograd.grad(ya, (xa, *_params(mine)), dy.to(dtype))
        gb = torch.autograd.grad(yb, (xb, *_params(plain)), dy)
        torch.testing.assert_close(ga[0].double(), gb[0], **tol_dx)
        if training or dtype == torch.float64:  # (eval with a gradient runs torch's eval batch norm, whose
            for a, b in zip(ga[1:], gb[1:]):    # bfloat16 parameter gradients are about 1% off)
                torch.testing.assert_close(a.double(), b, **tol_p)
    for name, buf in mine.named_buffers():
        if buf.is_floating_point():
            torch.testing.assert_close(buf.double(), dict(plain.named_buffers())[name], **tol_y)


@pytest.mark.parametrize("spec", MIXED_SPECS)
def test_batch_and_mixed_norms_with_activation_save_one_input(spec):
    if not _kernels.available():
        pytest.skip(_kernels.status())
    x = torch.randn(8, 16, 32, 32, requires_grad=True)
    m = normlab.make_norm(spec, 16, act="silu")
    with normlab.functional.fast_path(True):
        nbytes = saved_bytes(lambda: m(x))
    assert nbytes <= x.numel() * 4 + 64 * 8 * 16 * 8  # x, and (N, C) statistics


@pytest.mark.parametrize("spec", ["bn", "gn:2", "rms"] + MIXED_SPECS)
@pytest.mark.parametrize("engine_on", [True, False])
def test_an_unknown_activation_is_refused_on_every_route(spec, engine_on):
    """``act=`` with a name the engine does not know raises (naming it and the known ones) on
    the engine's route as on the plain path, instead of returning the norm without it; on the
    engine's route before any running statistic changes (the layer's step count aside: it counts
    the call before its function runs)."""
    from normlab.engine import epilogue

    with pytest.raises(ValueError, match=r"unknown activation 'tanh'; known: relu, leaky_relu, silu, gelu"):
        epilogue("tanh")
    assert epilogue(None) is None
    layer = normlab.make_norm(spec, 4, act="relu")
    layer.act.name = "tanh"  # (make_norm refuses the name itself; the functions are reached directly too)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    x = torch.randn(8, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with normlab.functional.fast_path(True if engine_on else False), pytest.raises(ValueError, match="'tanh'"):
        layer(x)
    if engine_on and _kernels.available():
        for k, v in layer.state_dict().items():
            assert k == "num_batches_tracked" or torch.equal(v, before[k]), k
