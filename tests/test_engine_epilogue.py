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
def test_half_precision_gelu_is_not_fused_silu_is(spec):
    # the rule of normlab.engine.fuses: in half precision the exact GELU runs after the norm
    # (torch's activation), SiLU in the engine's output pass; both equal the norm then torch's act
    if not _kernels.supports(torch.bfloat16):
        pytest.skip(_kernels.status())
    x = (torch.randn(8, 16, 32, 32) * 2 + 0.5).to(torch.bfloat16).requires_grad_()
    for act, node in (("gelu", "GeluBackward0"), ("silu", "EngineNormBackward")):
        m = normlab.make_norm(spec, 16, act=act)
        y = m(x)
        assert type(y.grad_fn).__name__ == node
        assert normlab.engine.fuses(act, torch.float32) and normlab.engine.fuses(act, torch.bfloat16) == (act == "silu")
        plain = normlab.make_norm(spec, 16)
        plain.load_state_dict(m.state_dict(), strict=False)
        want = ACTS[act](plain(x.detach().float())).to(torch.bfloat16)
        torch.testing.assert_close(y.float(), want.float(), rtol=2e-2, atol=2e-2)
