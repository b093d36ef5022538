"""The fused CPU path of mean-only batch norm, batch renorm, batch-instance norm and
switchable norm (descriptions run by normlab.engine): equality with the plain autograd
path (outputs, every gradient, running statistics), gradcheck, float64 references written
from the papers' equations on inputs whose mean dwarfs their spread, layouts, memory saved
for backward; online normalization's fast path. The routing rules shared by every fast entry
point: tests/test_routing.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import normlab
import normlab.functional as NF
from _helpers import graph_nodes
from normlab.bench import saved_bytes
from normlab import _kernels
from normlab.engine import fast_path

LARGE_NUMEL = 1 << 18  # inputs of this size take the engine wherever it runs

CL = torch.channels_last
FAST_NODES = {"EngineNormBackward"}
NAMES = ("mobn", "brn", "bin", "sn")


# one torch thread (tiny tensors: OpenMP barriers only add stalls on a shared 2-core machine),
# and the fused path forced on although these tensors are below its size threshold (tests
# that compare with the plain path switch it off explicitly)
pytestmark = pytest.mark.usefixtures("one_thread", "forced_fast_path", "kernel_mode")


_nodes = graph_nodes  # class names of every node in y's autograd graph


def _fast(y: torch.Tensor) -> bool:
    return bool(_nodes(y) & FAST_NODES)


def _state(name: str, c: int, dtype=torch.float64, seed: int = 1, far: bool = False) -> dict:
    """Parameters (requiring grad) and running buffers of one norm; ``far``: running statistics
    far from a unit batch (batch renorm's r and d then clip on every channel)."""
    g = torch.Generator().manual_seed(seed)
    p = {"weight": torch.rand(c, generator=g, dtype=dtype) + 0.5, "bias": torch.randn(c, generator=g, dtype=dtype),
         "rho": torch.rand(c, generator=g, dtype=dtype), "mw": torch.randn(3, generator=g, dtype=dtype),
         "vw": torch.randn(3, generator=g, dtype=dtype)}
    p = {k: v.requires_grad_() for k, v in p.items()}
    if far:
        p["rm"], p["rv"] = torch.full((c,), 50.0, dtype=dtype), torch.full((c,), 100.0, dtype=dtype)
    else:
        p["rm"], p["rv"] = torch.randn(c, generator=g, dtype=dtype), torch.rand(c, generator=g, dtype=dtype) * 3 + 0.2
    return p


def _call(name: str, x: torch.Tensor, p: dict, training: bool = True, cd: int = 1, momentum=0.1) -> torch.Tensor:
    if name == "mobn":
        return NF.mean_only_batch_norm(x, p["rm"], p["bias"], training=training, momentum=momentum, channel_dim=cd)
    if name == "brn":
        return NF.batch_renorm(x, p["rm"], p["rv"], p["weight"], p["bias"], training=training, momentum=momentum,
                               r_max=1.5, d_max=0.5, eps=1e-3, channel_dim=cd)
    if name == "bin":
        return NF.batch_instance_norm(x, p["rho"], p["rm"], p["rv"], p["weight"], p["bias"], training=training,
                                      momentum=momentum, eps=1e-3, channel_dim=cd)
    return NF.switchable_norm(x, p["mw"], p["vw"], p["rm"], p["rv"], p["weight"], p["bias"], training=training,
                              momentum=momentum, eps=1e-3, channel_dim=cd)


PARAMS = {"mobn": ("bias",), "brn": ("weight", "bias"), "bin": ("rho", "weight", "bias"),
          "sn": ("mw", "vw", "weight", "bias")}


def _input(layout: str, dtype=torch.float64) -> tuple[torch.Tensor, int]:
    if layout == "seq":  # (N, L, C), channel_dim=-1
        return torch.randn(4, 9, 6, dtype=dtype) * 1.5 + 0.7, -1
    if layout == "2d":
        return torch.randn(8, 6, dtype=dtype) * 1.5 + 0.7, 1
    x = torch.randn(4, 6, 5, 7, dtype=dtype) * 1.5 + 0.7
    return (x.contiguous(memory_format=CL) if layout == "cl" else x), 1


# ------------------------------------------------------------------ fast path == plain path
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["cf", "cl", "seq", "2d"])
@pytest.mark.parametrize("training", [True, False])
def test_fast_path_equals_plain_path(name, layout, training):
    if name == "bin" and layout == "2d":
        pytest.skip("batch-instance norm needs positions")
    x, cd = _input(layout)
    dy = torch.randn(x.shape, dtype=x.dtype)
    results = []
    for enabled in (True, False):
        p = _state(name, x.shape[cd])
        xx = x.detach().clone().requires_grad_()
        with fast_path(enabled):
            y = _call(name, xx, p, training, cd)
            y2 = _call(name, xx, p, training, cd)  # a second step, from the updated running statistics
        assert _fast(y) == (enabled and (training or name in ("bin", "sn")) and _kernels.available())
        (y * dy + y2).sum().backward()
        results.append([y, y2, xx.grad, p["rm"], p["rv"]] + [p[k].grad for k in PARAMS[name]])
        if enabled and layout == "cl":
            assert y.is_contiguous(memory_format=CL) and xx.grad.is_contiguous(memory_format=CL)
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("layout", ["cf", "cl", "seq"])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_fast_path(name, layout, training):
    x, cd = _input(layout)
    x = x[:3, :4] if layout != "seq" else x[:3, :5, :4]
    x = x.contiguous(memory_format=CL) if layout == "cl" else x.contiguous()
    x.requires_grad_()
    # batch renorm: r and d are constants of the backward; with running statistics far from
    # the batch they clip on every channel, so the forward is locally their function too
    p = _state(name, 4, far=name == "brn")
    params = [p[k] for k in PARAMS[name]]

    def f(x, *ps):
        q = dict(p, **dict(zip(PARAMS[name], ps)))
        return _call(name, x, q, training, cd, momentum=None)

    assert _fast(f(x, *params)) == ((training or name in ("bin", "sn")) and _kernels.available())
    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("name", NAMES)
def test_gradgradcheck_fast_path(name):
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64, requires_grad=True)
    p = _state(name, 4, far=name == "brn")
    params = [p[k] for k in PARAMS[name]]

    def f(x, *ps):
        return _call(name, x, dict(p, **dict(zip(PARAMS[name], ps))), True, 1, momentum=None)

    assert torch.autograd.gradgradcheck(f, (x, *params))


# ------------------------------------------------------- float64 references from the papers
def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_mean_small_spread_matches_float64_reference(name, channels_last):
    # mean 1e4 x the spread: a float32 E[x^2] - E[x]^2 would lose every digit
    x = (torch.randn(4, 6, 8, 8, dtype=torch.float64) + 1e4).float()
    if channels_last:
        x = x.contiguous(memory_format=CL)
    p = _state(name, 6, torch.float32)
    p["rm"], p["rv"] = p["rm"] + 1e4, p["rv"]
    rm0, rv0 = _np(p["rm"]).reshape(1, -1, 1, 1), _np(p["rv"]).reshape(1, -1, 1, 1)
    with fast_path(True):
        y = _call(name, x, p, True, 1)
    assert _fast(y) == _kernels.available()
    xn, eps = _np(x), 1e-3
    w, b = _np(p["weight"]).reshape(1, -1, 1, 1), _np(p["bias"]).reshape(1, -1, 1, 1)
    mu_b, var_b = xn.mean((0, 2, 3), keepdims=True), xn.var((0, 2, 3), keepdims=True)
    mu_i, var_i = xn.mean((2, 3), keepdims=True), xn.var((2, 3), keepdims=True)
    mu_l, var_l = xn.mean((1, 2, 3), keepdims=True), xn.var((1, 2, 3), keepdims=True)
    if name == "mobn":  # x - mu_B + bias (Salimans & Kingma 2016)
        ref = xn - mu_b + b
    elif name == "brn":  # Ioffe 2017, Algorithm 1
        sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(rv0 + eps)
        r = np.clip(sigma_b / sigma, 1 / 1.5, 1.5)
        d = np.clip((mu_b - rm0) / sigma, -0.5, 0.5)
        ref = w * ((xn - mu_b) / sigma_b * r + d) + b
    elif name == "bin":  # Nam & Kim 2018, eq. 4-5
        rho = _np(p["rho"]).reshape(1, -1, 1, 1)
        ref = w * (rho * (xn - mu_b) / np.sqrt(var_b + eps) + (1 - rho) * (xn - mu_i) / np.sqrt(var_i + eps)) + b
    else:  # Luo et al. 2019, eq. 3-5 (order: instance, layer, batch)
        wm, wv = [np.exp(_np(p[k])) / np.exp(_np(p[k])).sum() for k in ("mw", "vw")]
        mu = wm[0] * mu_i + wm[1] * mu_l + wm[2] * mu_b
        var = wv[0] * var_i + wv[1] * var_l + wv[2] * var_b
        ref = w * (xn - mu) / np.sqrt(var + eps) + b
    # float32 inputs near 1e4 are spaced 1e-3 apart and the one-pass affine form rounds once
    # more at that size (torch's BatchNorm2d: the same); E[x^2] - E[x]^2 gives errors of 1-100
    np.testing.assert_allclose(_np(y), ref, rtol=0, atol=1.5e-2)


@pytest.mark.parametrize("name", ["bin", "sn"])
@pytest.mark.parametrize("training", [True, False])
def test_mixed_norms_gradients_far_from_zero_equal_the_plain_path(name, training):
    """The mixed norms' adjoints (centred differences such as mu - mu_k, not E[..] - E[..]) where
    the mean is 1e4 x the spread, the running mean too: the engine's output, input and parameter
    gradients and running statistics equal float64 autograd through the plain path."""
    out = []
    for fast in (True, False):
        torch.manual_seed(1)
        m = normlab.make_norm(name, 6).double().train(training)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.rand(p.shape, dtype=p.dtype))
            m.running_mean.add_(1e4)
            m.running_var.mul_(1.7)
        x = (torch.randn(4, 6, 5, 5, dtype=torch.float64) + 1e4).requires_grad_()
        dy = torch.randn(4, 6, 5, 5, dtype=torch.float64)
        with fast_path(fast):
            y = m(x)
            assert _fast(y) == (fast and _kernels.available())
            y.backward(dy)
        out.append([y, x.grad, *(p.grad for p in m.parameters()), m.running_mean, m.running_var])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * b.abs().max().item())


# ---------------------------------------------------------------------- memory and strides
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_saved_for_backward_is_at_most_one_input_plus_statistics(name, channels_last):
    if not _kernels.available():
        pytest.skip("without the compiled kernels these norms run on the plain path")
    x = torch.randn(4, 8, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=CL)
    x.requires_grad_()
    p = _state(name, 8, torch.float32)
    with fast_path(True):
        nbytes = saved_bytes(lambda: _call(name, x, p))
    # statistics: per-(n, c) moments and the statistics function's small graph (a few dozen
    # (N, C) tensors, here 128 bytes each; an extra input-sized tensor is 32 kB)
    stats = 32 * 4 * 8 * 4
    limit = (0 if name == "mobn" else x.numel() * 4) + stats  # mean-only: dx = dy - mean(dy) needs no x
    assert nbytes <= limit


@pytest.mark.parametrize("name", NAMES)
def test_channels_last_output_and_gradient_without_copy(name):
    x = torch.randn(2, 4, 5, 6).contiguous(memory_format=CL).requires_grad_()
    p = _state(name, 4, torch.float32)
    with fast_path(True):
        y = _call(name, x, p)
    assert y.stride() == x.stride()
    y.backward(torch.randn(y.shape).contiguous(memory_format=CL))
    assert x.grad.stride() == x.stride()


@pytest.mark.parametrize("cls", [normlab.MeanOnlyBatchNorm, normlab.BatchRenorm, normlab.BatchInstanceNorm,
                                 normlab.SwitchableNorm])
def test_layers_take_the_fast_path_on_large_inputs(cls):
    layer = cls(8)
    x = torch.randn(4, 8, 96, 96, requires_grad=True)  # above both size thresholds
    assert x.numel() >= LARGE_NUMEL
    with fast_path(None):  # automatic
        assert _fast(layer(x)) == _kernels.available()
        layer.eval()
        y = layer(x)
    assert _fast(y) == (cls in (normlab.BatchInstanceNorm, normlab.SwitchableNorm) and _kernels.available())


# -------------------------------------------------------------------------- online norm
@pytest.mark.parametrize("decay", [0.0, 0.37, 0.999, 1.0])
def test_decayed_cumsum_equals_the_recurrence(decay):
    from normlab.functional._online_stream import decayed_cumsum

    inc, first = torch.randn(600, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)  # > one block
    before, last = decayed_cumsum(first, inc, decay)
    s, want = first.clone(), []
    for t in range(600):
        want.append(s.clone())
        s = decay * s + inc[t]
    torch.testing.assert_close(before, torch.stack(want), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, s, rtol=1e-10, atol=1e-10)


def _online(x, cd, bufs, w, b, ecm):
    return NF.online_norm(x, *bufs, w, b, ecm=ecm, channel_dim=cd, alpha_fwd=0.9, alpha_bkw=0.8)


@pytest.mark.parametrize("layout", ["cf", "cl", "seq", "2d"])
@pytest.mark.parametrize("ecm", ["ls", "ac", None])
@pytest.mark.parametrize("affine", [(True, True), (False, True), (False, False)])
def test_online_fast_path_equals_plain_path(layout, ecm, affine):
    # two steps: forward output, input and parameter gradients, stream and control buffers
    x, cd = _input(layout)
    c = x.shape[cd]
    results = []
    for enabled in (True, False):
        g = torch.Generator().manual_seed(3)
        w = (torch.rand(c, generator=g, dtype=x.dtype) + 0.5).requires_grad_() if affine[0] else None
        b = torch.randn(c, generator=g, dtype=x.dtype).requires_grad_() if affine[1] else None
        bufs = [torch.randn(c, generator=g) * 0.3, torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g) * 0.1,
                torch.randn(c, generator=g) * 0.1]
        bufs = [t.double() for t in bufs]
        xx = x.detach().clone().requires_grad_()
        out = []
        for _ in range(2):
            with fast_path(enabled):
                y = _online(xx, cd, bufs, w, b, ecm)
            assert ("OnlineTrainBackward" in _nodes(y)) == (enabled and _kernels.available())
            y.backward(torch.randn(y.shape, generator=g, dtype=x.dtype))
            out.append(y.detach().clone())
        results.append(out + [xx.grad] + [t.clone() for t in bufs] + [p.grad for p in (w, b) if p is not None])
        if enabled and layout == "cl":
            assert y.is_contiguous(memory_format=CL) and xx.grad.is_contiguous(memory_format=CL)
    for a, r in zip(*results):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["cf", "cl", "seq"])
@pytest.mark.parametrize("ecm", ["ls", None])
def test_online_fast_path_equals_plain_path_in_the_float_types(dtype, layout, ecm):
    """The layer as users train it: float32 weights and streams (a half-precision input as under
    autocast), two steps. The kernel path keeps its per-(n, c) math in float64 and the plain
    path in float32, so both are compared with a float64 run of the plain path on the same
    (rounded) input and state, each within the input's precision."""
    x, cd = _input(layout, torch.float32)
    x = x.to(dtype)
    c = x.shape[cd]

    def run(enabled: bool, work: torch.dtype) -> list:
        g = torch.Generator().manual_seed(3)
        w = (torch.rand(c, generator=g) + 0.5).to(work).requires_grad_()
        b = torch.randn(c, generator=g).to(work).requires_grad_()
        bufs = [(torch.randn(c, generator=g) * 0.3).to(work), (torch.rand(c, generator=g) + 0.5).to(work),
                (torch.randn(c, generator=g) * 0.1).to(work), (torch.randn(c, generator=g) * 0.1).to(work)]
        xx = (x if work == torch.float32 else x.to(work)).detach().clone().requires_grad_()
        out = []
        for _ in range(2):
            with fast_path(enabled):
                y = _online(xx, cd, bufs, w, b, ecm)
            assert ("OnlineTrainBackward" in _nodes(y)) == (enabled and _kernels.available())
            # (the gradient rounded to the input's dtype in every run, the float64 one too)
            y.backward(torch.randn(y.shape, generator=g).to(dtype).to(y.dtype))
            out.append(y.detach().clone())
        return out + [xx.grad] + [t.clone() for t in bufs] + [w.grad, b.grad]

    exact = run(False, torch.float64)
    tol = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}[dtype]
    for got in (run(True, torch.float32), run(False, torch.float32)):
        for i, (a, r) in enumerate(zip(got, exact)):
            assert a.dtype == (dtype if i < 3 else torch.float32)
            scale = max(1.0, r.abs().max().item())
            torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol * scale, msg=lambda m: f"result {i}: {m}")


@pytest.mark.parametrize("channels_last", [False, True])
def test_online_saves_one_input_plus_statistics(channels_last):
    layer = normlab.OnlineNorm(8)  # affine + layer scaling, the paper's default
    x = torch.randn(4, 8, 16, 16)
    x = (x.contiguous(memory_format=CL) if channels_last else x).requires_grad_()
    nbytes = saved_bytes(lambda: layer(x))
    if _kernels.available():
        assert nbytes <= x.numel() * 4 + 32 * 4 * 8 * 4
    with fast_path(None):  # above the threshold too
        big = torch.randn(4, 8, 96, 96, requires_grad=True)
        assert ("OnlineTrainBackward" in _nodes(layer(big))) == _kernels.available()


@pytest.mark.parametrize("layout", ["cf", "cl", "seq"])
def test_online_eval_fast_path_equals_plain_path(layout):
    x, cd = _input(layout)
    c = x.shape[cd]
    g = torch.Generator().manual_seed(5)
    bufs = [torch.randn(c, generator=g, dtype=x.dtype), torch.rand(c, generator=g, dtype=x.dtype) + 0.5, None, None]
    w, b = torch.rand(c, generator=g, dtype=x.dtype) + 0.5, torch.randn(c, generator=g, dtype=x.dtype)
    with fast_path(True):
        fast = NF.online_norm(x, *bufs, w, b, training=False, ecm=None, channel_dim=cd)
    with fast_path(False):
        plain = NF.online_norm(x, *bufs, w, b, training=False, ecm=None, channel_dim=cd)
    torch.testing.assert_close(fast, plain, rtol=1e-12, atol=1e-12)
    shape = [1] * x.ndim
    shape[cd] = c
    ref = (x - bufs[0].view(shape)) / torch.sqrt(bufs[1].view(shape) + 1e-5) * w.view(shape) + b.view(shape)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
