"""Every fast path equals the plain autograd reference (``fast_path(False)``): outputs, input
and parameter gradients and running statistics, over shapes, memory layouts, dtypes
(float32, float64, bfloat16, float16) and channel axes drawn by hypothesis; and on a device
the engine does not cover (``meta``, standing in for CUDA) every layer runs the plain path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import Phase, given, settings
from hypothesis import strategies as st

from _helpers import graph_nodes
from normlab.functional import fast_path
from normlab.registry import make_norm

NORMS = ("bn", "ln", "in", "gn:2", "rms", "mobn", "brn", "bin", "sn", "lnc", "rmsc", "pn", "evos0:2", "evob0")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TOL = {torch.float64: 1e-9, torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(spec: str, x: torch.Tensor, dy: torch.Tensor, cd: int, fast: bool | None):
    torch.manual_seed(0)
    # parameters in the input's dtype; with half inputs float32 ones, as under autocast
    m = make_norm(spec, x.shape[cd], channel_dim=cd).to(x.dtype if x.dtype in (torch.float32, torch.float64)
                                                         else torch.float32)
    with torch.no_grad():
        for p in m.parameters():  # (drawn in float32: the same values in every dtype)
            p.add_(torch.rand(p.shape).to(p.dtype) * 0.5)
    xx = x.detach().clone().requires_grad_()
    with fast_path(fast):
        y = m(xx)
        y2 = m(xx)  # a second step, from the updated running statistics
        (y.float() * dy.float() + y2.float()).sum().backward()
    return [y, y2, xx.grad] + [p.grad for p in m.parameters()] + [b for b in m.buffers() if b.is_floating_point()]


@settings(max_examples=40, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target])
@given(spec=st.sampled_from(NORMS), dtype=st.sampled_from(DTYPES), n=st.integers(2, 4),
       c=st.sampled_from([2, 4, 6]), spatial=st.lists(st.integers(2, 6), min_size=0, max_size=2),
       layout=st.sampled_from(["first", "last", "channels_last"]), seed=st.integers(0, 2 ** 16))
def test_every_path_equals_the_plain_path(spec, dtype, n, c, spatial, layout, seed):
    if spec in ("in", "bin", "evob0") and not spatial:
        return  # (these need positions)
    shape = [n, c, *spatial]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 2 + 0.5
    dy = torch.randn(shape, generator=g)
    cd = 1
    if layout == "last":  # (N, *positions, C), channel_dim=-1
        x, dy, cd = x.movedim(1, -1).contiguous(), dy.movedim(1, -1).contiguous(), -1
    elif layout == "channels_last" and x.ndim == 4:
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    x, dy = x.to(dtype), dy.to(dtype)
    results = [_run(spec, x, dy, cd, fast) for fast in (True, None, False)]
    tol = TOL[dtype]
    # in half precision the plain path is itself rounded: where a result is ill-conditioned (a
    # per-sample variance of two nearly equal values: the input gradient is a cancellation
    # scaled by a large 1/std) the paths may differ by more than tol and still both be right to
    # their precision; then the engine must be at most twice as far from the float64 plain path
    # (same rounded inputs) as the half-precision plain path is
    exact = _run(spec, x.double(), dy.double(), cd, False) if dtype in (torch.bfloat16, torch.float16) else None
    for got in results[:2]:
        for i, (a, b) in enumerate(zip(got, results[2])):
            assert a.dtype == b.dtype
            scale = max(1.0, b.float().abs().max().item())
            try:
                torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * scale)
            except AssertionError:
                if exact is None:
                    raise
                r = exact[i].double()
                err, ref_err = (a.double() - r).abs().max().item(), (b.double() - r).abs().max().item()
                assert err <= 2 * ref_err + tol * scale, (i, err, ref_err)


@pytest.mark.parametrize("spec", NORMS + ("on", "frn", "grn"))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("layout", ["first", "last", "channels_last"])
def test_every_path_far_from_zero_equals_the_float64_plain_path(spec, dtype, layout):
    """Inputs whose mean is 1e4 x their spread (where a variance taken as E[x^2] - E[x]^2 keeps no
    digit in float32 and half of them in float64): every fast path's outputs, input and parameter
    gradients and running statistics, two training steps, against the plain path run in float64
    on the same values. (The per-channel batch pass, switchable and batch-instance norm have their
    own tests of this, above and in test_fused_variants.py, the latter in eval too.)"""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(3, 4, 5, 6, generator=g, dtype=torch.float64) + 1e4
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    cd = 1
    if layout == "last":
        x, dy, cd = x.movedim(1, -1).contiguous(), dy.movedim(1, -1).contiguous(), -1
    elif layout == "channels_last":
        x, dy = x.contiguous(memory_format=torch.channels_last), dy.contiguous(memory_format=torch.channels_last)
    x = x.to(dtype).double()  # (the values the fast path sees, exactly)
    want = _run(spec, x, dy, cd, False)
    # float32: the mean is rounded to 1e-3 of the spread and an affine form x a + b rounds |mean| a
    # once more (torch's BatchNorm2d: the same), errors of a few 1e-3 of a result's size; where a
    # result is ill-conditioned (layer norm's input gradient over 4 channels: a cancellation scaled
    # by 1 / var) the float32 plain path is itself further off, and the fast path may be up to
    # twice as far (E[x^2] - E[x]^2 would be off by the whole spread)
    tol = 1e-9 if dtype == torch.float64 else 1.5e-2  # (of the result's largest size, and of each value)
    plain = _run(spec, x.to(dtype), dy.to(dtype), cd, False) if dtype == torch.float32 else want
    for fast in (True, None):
        got = _run(spec, x.to(dtype), dy.to(dtype), cd, fast)
        for i, (a, b, p) in enumerate(zip(got, want, plain)):
            assert a.dtype == dtype
            scale = max(1.0, b.abs().max().item())
            off = (a.double() - b).abs()
            if (off <= tol * (scale + b.abs())).all():
                continue
            err, plain_err = off.max().item(), (p.double() - b).abs().max().item()
            assert err <= 2 * plain_err, (f"result {i} (fast={fast})", err, plain_err, scale)


@pytest.mark.parametrize("spec", NORMS)
def test_meta_device_runs_the_plain_path(spec):
    """A device the engine does not cover (meta here, CUDA on a GPU machine) takes plain autograd."""
    m = make_norm(spec, 4).to("meta")
    x = torch.randn(3, 4, 5, 5, device="meta", requires_grad=True)
    y = m(x)
    names = graph_nodes(y)
    assert y.device.type == "meta" and y.shape == x.shape
    assert not any(name.startswith(("EngineNorm", "OnlineTrain")) for name in names)
    y.sum().backward()
    assert x.grad.shape == x.shape
    m.eval()
    assert m(x).shape == x.shape


def test_views_like_x_are_its_kernel_views():
    """``view_like`` (the engine's view of y, dy and dx) is ``kernel_views``' view wherever the
    tensor is laid out as x, and refuses (None) one in another layout."""
    from normlab.engine.routing import kernel_views, view_like

    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, 4, 5).contiguous(memory_format=fmt)
        layout, v = kernel_views(x, 1)
        t = torch.randn_like(x)
        got = view_like(t, layout, 1)
        assert got.shape == v.shape and got.stride() == v.stride() and got.data_ptr() == t.data_ptr()
        assert torch.equal(got, kernel_views(t, 1)[1])
        other = x.contiguous(memory_format=torch.channels_last if fmt == torch.contiguous_format
                             else torch.contiguous_format)
        assert view_like(other, layout, 1) is None




def test_kept_view_geometry_is_the_views_of_each_tensor():
    """``kernel_views`` keeps the view's layout, shape and strides per (shape, strides, channel
    axis): a later tensor of that geometry (another storage, a storage offset, the channel axis
    elsewhere, no positions, a size-1 axis) gets the view :func:`views` makes of it, and a
    tensor no view fits gets None, the first time and after."""
    from normlab.engine import routing

    base = torch.randn(3, 4, 5, 6)
    cases = [
        (base, 1), (base.contiguous(memory_format=torch.channels_last), 1),
        (base.movedim(1, -1).contiguous(), 3), (torch.randn(8, 4), 1), (torch.randn(1, 4, 1, 6), 1),
        (torch.randn(2, 3, 4, 5, 6)[1], 1),  # a storage offset
        (base.transpose(2, 3), 1), (base[:, :, ::2], 1),  # no kernel view
    ]
    for x, cd in cases:
        for _ in range(2):  # derived, then kept
            got, ref = routing.kernel_views(x, cd), routing.views(x, cd)
            if ref is None:
                assert got is None
                continue
            layout, v = got
            if ref[0] == "cf" and ref[1].shape[2] == 1:  # (N, C) is taken channels-last (N, 1, C)
                assert layout == "cl" and torch.equal(v, ref[1].reshape(v.shape))
            else:
                assert layout == ref[0] and v.shape == ref[1].shape and v.stride() == ref[1].stride()
            assert v.data_ptr() == x.data_ptr() and torch.equal(v.flatten(), ref[1].flatten())
        y = torch.randn_like(x)  # same geometry, other storage: its own values
        if routing.views(x, cd) is not None:
            assert torch.equal(routing.kernel_views(y, cd)[1].flatten(), routing.views(y, cd)[1].flatten())
@pytest.mark.parametrize("spec", ["bn", "brn", "bin", "sn", "gn:2"])
@pytest.mark.parametrize("x_fmt", ["contiguous", "channels_last"])
def test_gradient_in_another_layout(spec, x_fmt):
    """The incoming gradient laid out otherwise than x (channels-last x, contiguous dy and the
    reverse) is read in x's layout: the engine's gradients equal the plain path's."""
    fmts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    x = (torch.randn(3, 4, 5, 6) * 2 + 0.5).contiguous(memory_format=fmts[x_fmt])
    dy = torch.randn(3, 4, 5, 6).contiguous(memory_format=fmts["contiguous" if x_fmt == "channels_last"
                                                                else "channels_last"])
    out = []
    for fast in (True, False):
        torch.manual_seed(0)
        m = make_norm(spec, 4)
        xx = x.detach().clone().requires_grad_()
        with fast_path(fast):
            y = m(xx)
            assert any(n.startswith("EngineNorm") for n in graph_nodes(y)) == fast
            y.backward(dy)
        out.append([y, xx.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("spec", ["lnc", "rmsc"])
@pytest.mark.parametrize("shape, cd, fmt", [((3, 5, 16), -1, None), ((2, 16, 3, 4), 1, torch.channels_last),
                                            ((4, 16), 1, None), ((2, 3, 16), 2, None)])
def test_norm_over_the_channels_runs_rows_as_they_are(spec, shape, cd, fmt):
    """Layer and RMS norm over the channel axis alone, the channels innermost in memory: the
    engine's row passes on the input as it is, so its graph holds the engine's node and no view
    of the input or output; a gradient arriving non-contiguous (a transpose downstream) is
    taken too. Output, input and parameter gradients equal the float64 plain path's."""
    x = torch.randn(shape) * 3 + 1
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    dy = torch.randn(shape[::-1]).permute(*range(len(shape) - 1, -1, -1))  # (non-contiguous)
    got = []
    for fast, dtype in ((True, torch.float32), (False, torch.float64)):
        torch.manual_seed(0)
        m = make_norm(spec, shape[cd], channel_dim=cd).to(dtype)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.rand(p.shape).to(dtype))
        xx = x.detach().to(dtype).requires_grad_()
        with fast_path(fast):
            y = m(xx)
            if fast:
                assert graph_nodes(y) == {"EngineNormBackward", "AccumulateGrad"}, graph_nodes(y)
                assert y.stride() == x.stride()
            y.backward(dy.to(dtype))
        got.append([y, xx.grad, *(p.grad for p in m.parameters())])
    for a, b in zip(*got):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_running_statistics_from_the_engine(channels_last):
    """Instance norm tracking running statistics reads the engine's per-(n, c) moments (the one
    description that keeps them after the forward, ``keeps_moments``): the engine's running
    buffers equal the plain path's, step after step, and so do the eval outputs."""
    from normlab import InstanceNorm

    x = torch.randn(4, 6, 9, 7) * 3 + 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    layers = [InstanceNorm(6, track_running_stats=True, momentum=0.3) for _ in range(2)]
    for layer, fast in zip(layers, (True, False)):
        with fast_path(fast):
            for step in range(3):
                layer(x * (step + 1)).sum().backward()
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(layers[0], name), getattr(layers[1], name), rtol=1e-5, atol=1e-6)
    assert not torch.equal(layers[0].running_var, torch.ones(6))
    with torch.no_grad():
        torch.testing.assert_close(layers[0].eval()(x), layers[1].eval()(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", ["bn", "mobn", "bn+relu", "bn+silu", "bn+gelu", "brn", "brn+silu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("far", [False, True])
def test_batch_norm_one_channel_at_a_time_equals_the_plain_path(spec, dtype, far, monkeypatch):
    """The per-channel pass (``batch_forward``/``batch_backward``, taken on large inputs with long
    rows; batch renorm's backward alone, with weight w r) with its size rule lowered: taken on both
    steps, and equal to the plain path in outputs, input and parameter gradients and running
    statistics, also where the mean is 1e4 x the spread."""
    from normlab import _kernels
    from normlab.engine import function

    if not _kernels.available():
        pytest.skip(_kernels.status())
    monkeypatch.setattr(function, "BATCH_FUSED_MIN_LENGTH", 1)
    monkeypatch.setattr(function, "BATCH_FUSED_MIN_BYTES", 0)
    calls = []
    for name in ("batch_forward", "batch_backward"):
        real = getattr(_kernels, name)
        monkeypatch.setattr(_kernels, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or _real(*a, **k))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 6, 5, 7, generator=g, dtype=torch.float64)
    x = (x + 1e4 if far else x * 2 + 0.5).to(dtype).double()  # (the values the kernels see)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    base, _, act = spec.partition("+")
    kw = {"act": act} if act else {}

    def run(xin: torch.Tensor, fast: bool):
        torch.manual_seed(0)
        m = make_norm(base, 6, **kw).to(xin.dtype)
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.rand(p.shape, dtype=torch.float64).to(p.dtype) * 0.5)
        xx = xin.detach().clone().requires_grad_()
        with fast_path(fast):
            y, y2 = m(xx), m(xx)
            (y * dy.to(y.dtype) + y2).sum().backward()
        return [y, y2, xx.grad] + [p.grad for p in m.parameters()] + [b for b in m.buffers() if b.is_floating_point()]

    got = run(x.to(dtype), True)
    assert calls.count("batch_forward") == (0 if base == "brn" else 2) and calls.count("batch_backward") == 2, calls
    want = run(x, False)  # the plain path in float64
    # float32 values near 1e4 are 1e-3 apart and the affine form rounds once more at that size
    # (as test_large_mean_small_spread_matches_float64_reference: torch's BatchNorm2d the same)
    tol = 1e-9 if dtype == torch.float64 else 1.5e-2 if far else 2e-4
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol * max(1.0, b.abs().max().item()),
                                   msg=lambda m, i=i: f"result {i}: {m}")


def test_batch_norm_one_channel_at_a_time_only_where_measured_faster(monkeypatch):
    """At the default sizes the per-channel pass runs on a large float32 channel-first input with
    long rows, and not on short rows, half precision or channels-last."""
    from normlab import _kernels

    if not _kernels.available():
        pytest.skip(_kernels.status())
    calls = []
    real = _kernels.batch_forward
    monkeypatch.setattr(_kernels, "batch_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    m = make_norm("bn", 4)
    cases = [((2, 4, 512, 1024), torch.float32, None, 1), ((2, 4, 16, 16), torch.float32, None, 0),
             ((2, 4, 512, 1024), torch.bfloat16, None, 0), ((2, 4, 512, 1024), torch.float32, torch.channels_last, 0)]
    for shape, dtype, fmt, want in cases:
        calls.clear()
        x = torch.randn(shape).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        m(x.requires_grad_())
        assert len(calls) == want, (shape, dtype, fmt)
