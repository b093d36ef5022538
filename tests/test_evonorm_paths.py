"""EvoNorm-S0's two kernel paths (per sample from cache, ``evos0_impl.h``; the generic passes,
``evonorm_impl.h``) each equal the plain autograd path: outputs, input and parameter gradients,
in every dtype and both layouts; the test checks which path ran. And the S0 sigmoid of the
kernels (its own exp2 polynomial) against float64 torch over the whole clamped range."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import functional as NF
from _helpers import assert_streaming_changes_nothing
from normlab._kernels import evonorm as kernels

pytestmark = pytest.mark.usefixtures("one_thread")

TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}
CALLS = ("evos0_forward", "evos0_backward", "evonorm_forward", "evonorm_reduce", "evonorm_dx")


def _counted(monkeypatch) -> dict:
    """Counts the calls of the EvoNorm kernel bindings (the descriptions call them through the module)."""
    counts = dict.fromkeys(CALLS, 0)
    for name in CALLS:
        def wrapped(*a, __f=getattr(kernels, name), __n=name, **k):
            counts[__n] += 1
            return __f(*a, **k)
        monkeypatch.setattr(kernels, name, wrapped)
    return counts


def _step(m, x, dy, fast: bool) -> list[torch.Tensor]:
    xx = x.detach().clone().requires_grad_()
    for p in m.parameters():
        p.grad = None
    with NF.fast_path(fast):
        y = m(xx)
        y.backward(dy)
    return [y, xx.grad, *(p.grad for p in m.parameters())]


# with one thread: N * G (channel-first) or N (channels-last) work items of at least 2 run per
# sample from cache, fewer the generic passes
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["first", "channels_last"])
@pytest.mark.parametrize("n, groups, fused", [(3, 2, True), (1, 1, False)])
def test_evonorm_s0_kernel_paths_equal_the_plain_path(dtype, layout, n, groups, fused, monkeypatch):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(n, 8, 6, 7, generator=g, dtype=torch.float64) * 2 + 0.7
    x[:, 1] *= 30  # a channel where the sigmoid saturates on both sides (v x beyond +-40)
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, dy = x.to(dtype).contiguous(memory_format=fmt), dy.to(dtype).contiguous(memory_format=fmt)
    m = normlab.make_norm(f"evos0:{groups}", 8).to(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    with torch.no_grad():
        m.v.copy_(torch.linspace(-2.0, 1.5, 8))
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-0.5, 0.5, generator=g)
    counts = _counted(monkeypatch)
    got = _step(m, x, dy, True)
    fwd, bwd = ("evos0_forward", "evos0_backward") if fused else ("evonorm_forward", "evonorm_dx")
    assert counts[fwd] == 1 and counts[bwd] == 1, counts
    assert sum(counts.values()) == (2 if fused else 3), counts  # (generic: forward, sums, input gradient)
    ref = _step(m, x, dy, False)
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype, i
        scale = max(1.0, b.double().abs().max().item())
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale, msg=f"result {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["first", "channels_last"])
@pytest.mark.parametrize("wide", [True, False])
def test_evonorm_b0_backward_with_and_without_the_kept_slope_equals_the_plain_path(dtype, layout, wide, monkeypatch):
    # B0's backward keeps dy slope(x) between its sums and its input gradient only for channels-last
    # bfloat16 on AVX-512 (engine/describe_modern.py); both choices, forced here on any CPU, equal
    # the plain path, and the test checks which one ran
    monkeypatch.setattr(normlab._kernels, "wide_vectors", lambda: wide)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 8, 6, 7, generator=g, dtype=torch.float64) * 2 + 0.5
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x, dy = x.to(dtype).contiguous(memory_format=fmt), dy.to(dtype).contiguous(memory_format=fmt)
    m = normlab.make_norm("evob0", 8)
    with torch.no_grad():
        m.v.copy_(torch.linspace(-1.5, 1.5, 8))  # (both sides of max(D, v x + E) taken)
        m.weight.uniform_(0.5, 1.5, generator=g)
        m.bias.uniform_(-0.5, 0.5, generator=g)
    kept = []
    reduce = kernels.evonorm_reduce

    def recorded(*a, **k):
        kept.append(k.get("keep") is not None)
        return reduce(*a, **k)

    monkeypatch.setattr(kernels, "evonorm_reduce", recorded)
    got = _step(m, x, dy, True)
    assert kept == [wide and layout == "channels_last" and dtype == torch.bfloat16]
    ref = _step(m, x, dy, False)
    tol = TOL[dtype]
    for i, (a, b) in enumerate(zip(got, ref)):
        scale = max(1.0, b.double().abs().max().item())
        torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol * scale, msg=f"result {i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_evonorm_s0_sigmoid_against_float64(dtype):
    # f(x) = x sigmoid(v x) from the forward pass with scale 1 and shift 0, over v x in [-130, 130]
    # (the clamp at |v x log2(e)| = 125 included): float32 within 4e-7 relative plus the rounding
    # of the argument v x (|v x| 2^-23, which dominates far out); the half types correctly rounded
    # but for values near a tie, there one unit in the last place off
    t = torch.linspace(-130, 130, 200_003, dtype=torch.float64)
    v = torch.tensor([0.5, 1.0, 3.0], dtype=torch.float64)
    x = (t / v.view(3, 1)).view(1, 3, -1).to(dtype)
    out = torch.empty_like(x)
    one, zero = torch.ones(1, 3, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    kernels.evonorm_forward("s0", x, out, "cf", v, None, None, one, zero)
    z = x.double() * v.view(1, 3, 1)
    ref = x.double() * torch.sigmoid(z)
    big = ref.abs() > 1e-30  # (beyond the clamp the kernel's value is ~x 2^-125: also tiny)
    assert out.double().abs()[~big].max().item() < 1e-30
    out, ref, z = out[big].double(), ref[big], z[big]
    if dtype == torch.float32:
        rel = (out - ref).abs() / ref.abs()
        assert (rel <= 4e-7 + z.abs() * 2.0 ** -23).all()
    else:
        wrong = out != ref.to(dtype).double()
        assert wrong.double().mean().item() < 2e-3
        # where it differs, by one unit in the last place at most
        ulp = ref.to(dtype).double().abs() * 2.0 ** -(8 if dtype == torch.bfloat16 else 11)
        assert ((out - ref).abs()[wrong] <= ulp[wrong]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["s0", "b0"])
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("shape", [(2, 3, 7), (2, 5, 256), (3, 4, 700), (2, 64, 9), (2, 300, 5), (1, 200, 3)])
def test_evonorm_streamed_passes_equal_plain_stores(dtype, kind, layout, shape):
    # the forward and input-gradient passes stream large float32/float64 outputs (forced on here
    # for small ones: channel-first rows below, at and above the streamed chunk; channels-last
    # chunks of several rows (64 channels: 8, with a last short one; 200: 2) and rows too wide to
    # stream (300); outputs off a 64-byte line); they write exactly what plain stores write, and
    # the forward the map's value
    n, c, length = shape
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    dstd, istd = (torch.rand(n, c, generator=g, dtype=torch.float64) + 0.5 for _ in range(2))
    scale, shift, a, b, m, k = (torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(6))
    d_e = (dstd, istd) if kind == "b0" else (None, None)

    lay = (lambda t: t.contiguous()) if layout == "cf" else (lambda t: t.transpose(1, 2).contiguous())
    xl, dyl = lay(x), lay(dy)

    def passes(off):
        y, dx = (torch.zeros(x.numel() + off, dtype=dtype)[off:].view(xl.shape) for _ in range(2))
        kernels.evonorm_forward(kind, xl, y, layout, v, *d_e, scale, shift)
        kernels.evonorm_dx(kind, dyl, xl, dx, layout, v, *d_e, a, b, m, k)
        return (y, dx) if layout == "cf" else (y.transpose(1, 2), dx.transpose(1, 2))

    streamed = assert_streaming_changes_nothing(passes)
    xd, nc = x.double(), (lambda t: t.unsqueeze(2))
    if kind == "b0":
        f = xd / torch.maximum(nc(dstd), v.view(1, c, 1) * xd + nc(istd))
    else:
        f = xd * torch.sigmoid(v.view(1, c, 1) * xd)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(streamed[0].double(), f * nc(scale) + nc(shift), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("shape", [(2, 5, 7), (3, 70, 33), (2, 64, 301), (1, 9, 1)])
def test_evonorm_b0_passes_against_float64(dtype, layout, shape):
    # B0's three passes against its formulas in float64 (evonorm_impl.h): odd row counts (the
    # channels-last passes take two rows a step, then the last one alone), channel counts off the
    # vector width, and both sides of max(D, v x + E) well represented
    n, c, length = shape
    g = torch.Generator().manual_seed(7 * c + length)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.rand(c, generator=g, dtype=torch.float64) + 0.5
    dstd = torch.rand(1, c, generator=g, dtype=torch.float64) + 0.5
    istd = torch.rand(n, c, generator=g, dtype=torch.float64) + 0.5
    scale, shift, a, b, m, k = (torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(6))
    lay = (lambda t: t.contiguous()) if layout == "cf" else (lambda t: t.transpose(1, 2).contiguous())
    back = (lambda t: t) if layout == "cf" else (lambda t: t.transpose(1, 2))
    xl, dyl = lay(x), lay(dy)
    y, dx = torch.empty_like(xl), torch.empty_like(xl)
    kernels.evonorm_forward("b0", xl, y, layout, v, dstd, istd, scale, shift)
    sums = kernels.evonorm_reduce("b0", dyl, xl, layout, v, dstd, istd)
    kernels.evonorm_dx("b0", dyl, xl, dx, layout, v, dstd, istd, a, b, m, k)

    xd, dyd, nc = x.double(), dy.double(), (lambda t: t.unsqueeze(2))
    r = v.view(1, c, 1) * xd + nc(istd)
    left = nc(dstd).expand_as(r) >= r
    assert 0.1 < left.double().mean().item() < 0.9
    u = 1 / torch.maximum(nc(dstd), r)
    slope = torch.where(left, u, nc(istd) * u * u)
    q = dyd * xd * u * u
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back(y).double(), xd * u * nc(scale) + nc(shift), **tol)
    torch.testing.assert_close(back(dx).double(), nc(a) * dyd * slope + nc(b) * (xd - nc(m)) + nc(k), **tol)
    want = [dyd * xd * u, dyd, torch.where(left, q, 0), torch.where(left, 0, q), torch.where(left, 0, q * xd)]
    stol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(sums, torch.stack([t.sum(2) for t in want]), **stol)
