"""The half-precision kernels (bfloat16, float16) in channels-last against their channel-first
twins on the same values. The channels-last passes read two channels per 32-bit word with the
channels' coefficients kept in a permuted order (kernels_impl.h: PAIR_AT), or (float16 where F16C
converts it, bfloat16's output rows on AVX2) eight values at a time converted by other
instructions than the channel-first passes'; the channel-first ones go one row at a time. Every
element-wise output (the affine
pass with each activation epilogue, dy' kept by the reduce pass, the input gradient) is computed
by the same formula from the same values, so the two layouts must agree bit for bit: a channel
paired with another's coefficients, or a word's halves swapped, shows. Sums and moments are
summed in different orders, and are checked against a float64 reference instead."""

from __future__ import annotations

import pytest
import torch

from normlab import _kernels
from normlab._kernels import evonorm as _evonorm

pytestmark = pytest.mark.skipif(not _kernels.available(), reason=_kernels.status())

# full channel blocks (64, 128), a full block and a half one (192 = 3 x 64 in bfloat16's
# 64-channel blocks), a partial block (70), an odd channel count (33)
SHAPES = [(2, 64, 300), (3, 128, 50), (2, 192, 17), (2, 70, 33), (3, 33, 20)]
ACTS = [None, (1, 0.1), (2, 0.0), (3, 0.0), "tlu"]


def _act(spec, n, c, g):
    if spec == "tlu":
        return _kernels.Epilogue(4, 0.0, torch.randn(n, c, generator=g, dtype=torch.float64))
    return None if spec is None else _kernels.Epilogue(*spec)


def _views(x):
    """The (N, C, L) tensor as the kernels' cf view and as a cl (N, L, C) view of the same values."""
    return x.contiguous(), x.transpose(1, 2).contiguous()


def _same(cf, cl, ulps=0):
    """A cl output equal bit for bit to its cf twin (or within ``ulps`` units in the last place)."""
    a, b = cf.contiguous().view(torch.int16).int(), cl.transpose(1, 2).contiguous().view(torch.int16).int()
    assert ((a - b).abs() <= ulps).all(), f"{(a != b).sum().item()} of {a.numel()} values differ"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", ACTS, ids=["none", "leaky", "silu", "gelu", "tlu"])
def test_channels_last_element_wise_passes_equal_channel_first(dtype, shape, act):
    n, c, _ = shape
    g = torch.Generator().manual_seed(n * 1000 + c)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    center, scale, shift, a, b, k = (torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(6))
    ep = _act(act, n, c, g)
    xf, xl = _views(x)
    dyf, dyl = _views(dy)
    outs = {}
    for lay, v, d in (("cf", xf, dyf), ("cl", xl, dyl)):
        y = torch.empty_like(v)
        _kernels.affine(v, y, lay, center, scale, shift, act=ep)
        yi = v.clone()  # in place
        _kernels.affine(yi, yi, lay, center, scale, shift, act=ep)
        kept = torch.full_like(v, 3.0)
        sums = _kernels.reduce(d, v, lay, center, act=ep, scale=scale, shift=shift,
                               keep=kept if ep is not None else None)
        _kernels.dx(d, v, kept, lay, center, a, b, k, act=ep, scale=scale, shift=shift, kept=ep is not None)
        outs[lay] = (y, yi, kept, sums)
    (yf, yif, dxf, sf), (yl, yil, dxl, sl) = outs["cf"], outs["cl"]
    # (float16's GELU epilogue is compiled with another rounding of one step in the two
    # layouts' loops, on main as well: a value may differ by one unit in the last place)
    ulps = 1 if dtype == torch.float16 and act == (3, 0.0) else 0
    _same(yf, yl, ulps)
    _same(yif, yil, ulps)
    _same(dxf, dxl, ulps)  # (with SiLU and GELU it went through the kept dy')
    for u, w in zip(sf, sl):  # float sums in another order
        torch.testing.assert_close(w, u, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_channels_last_moments_and_sums_match_float64(dtype, shape):
    n, c, _ = shape
    g = torch.Generator().manual_seed(7 * c + n)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    center = torch.randn(n, c, generator=g, dtype=torch.float64)
    _, xl = _views(x)
    _, dyl = _views(dy)
    ref, dref = x.double(), dy.double()  # the values the kernels see
    mean, m2 = _kernels.moments(xl, "cl")
    torch.testing.assert_close(mean, ref.mean(2), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m2, ((ref - ref.mean(2, keepdim=True)) ** 2).sum(2), rtol=1e-5, atol=1e-4)
    gs, hs = _kernels.reduce(dyl, xl, "cl", center)
    torch.testing.assert_close(gs, dref.sum(2), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(hs, (dref * (ref - center[..., None])).sum(2), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kind", ["s0", "b0"])
def test_channels_last_evonorm_maps_equal_channel_first(dtype, shape, kind):
    """EvoNorm's element maps (evonorm_impl.h): the channels-last forward, dy slope(x) kept by the
    sums pass and the input gradient (kept and not) bit for bit as channel-first; the five sums
    within float rounding of channel-first's."""
    n, c, _ = shape
    g = torch.Generator().manual_seed(31 * c + n)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.3).to(dtype)
    dy = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(c, generator=g, dtype=torch.float64)
    dstd = torch.rand(1, c, generator=g, dtype=torch.float64) + 0.5
    istd = torch.rand(n, c, generator=g, dtype=torch.float64) + 0.5
    scale, shift, a, b, m, k = (torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(6))
    xf, xl = _views(x)
    dyf, dyl = _views(dy)
    outs = {}
    for lay, xv, dv in (("cf", xf, dyf), ("cl", xl, dyl)):
        y, dx, kept = torch.empty_like(xv), torch.empty_like(xv), torch.full_like(xv, 3.0)
        _evonorm.evonorm_forward(kind, xv, y, lay, v, dstd, istd, scale, shift)
        sums = _evonorm.evonorm_reduce(kind, dv, xv, lay, v, dstd, istd, keep=kept)
        kept_in = kept.clone()
        _evonorm.evonorm_dx(kind, dv, xv, kept, lay, v, dstd, istd, a, b, m, k, kept=True)
        _evonorm.evonorm_dx(kind, dv, xv, dx, lay, v, dstd, istd, a, b, m, k)
        outs[lay] = (y, kept_in, kept, dx, sums)
    for u, w in zip(outs["cf"][:4], outs["cl"][:4]):
        _same(u, w)
    torch.testing.assert_close(outs["cl"][4], outs["cf"][4], rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("c", [67, 24])  # whole rows with a tail of three; one part block
def test_output_rounding_equals_torchs_on_ties_overflow_and_specials(dtype, c):
    """x - center through the affine pass (scale 1, shift 0: one float32 rounding) then rounded to
    the type as torch rounds float32 (nearest even, NaN kept, past the largest value infinite),
    in both layouts: the conversions of every loop (words of two values, eight-value chunks, one
    value at a time) on halfway cases, overflow, infinities, NaN and subnormal results."""
    fi = torch.finfo(dtype)
    half = fi.eps / 2  # half a unit in the last place at 1
    n, length = 2, 9
    g = torch.Generator().manual_seed(c)
    x = torch.randn(n, c, length, generator=g, dtype=torch.float64)
    center = torch.randn(n, c, generator=g, dtype=torch.float64)
    # channel 0: 1 + half, (1 + ulp) + half, 2 + half: ties to even, down, up, and not a tie
    x[:, 0, :4] = torch.tensor([1.0, 1.0 + 2 * half, 3.0, -1.0 - 2 * half], dtype=torch.float64)
    center[:, 0] = -half
    x[:, 1, :5] = torch.tensor([float("inf"), float("-inf"), float("nan"), fi.max, -fi.max], dtype=torch.float64)
    center[:, 1] = 0.0
    x[:, 2, :2] = torch.tensor([fi.max, fi.max / 2], dtype=torch.float64)
    center[:, 2] = -fi.max  # x - center past the largest value: infinite
    x[:, 3, :3] = torch.tensor([fi.tiny, 2 * fi.tiny, -fi.tiny], dtype=torch.float64)
    center[:, 3] = 0.75 * fi.tiny  # results below the smallest normal
    x = x.to(dtype)
    center = center.float().double()  # (the kernels take the centre as float32)
    want = (x.float() - center.float()[..., None]).to(dtype)
    ones, zeros = torch.ones(n, c, dtype=torch.float64), torch.zeros(n, c, dtype=torch.float64)
    xf, xl = _views(x)
    for lay, v in (("cf", xf), ("cl", xl)):
        y = torch.empty_like(v)
        _kernels.affine(v, y, lay, center, ones, zeros)
        got = y if lay == "cf" else y.transpose(1, 2)
        assert torch.equal(got.isnan(), want.isnan()), lay
        ok = (got.view(torch.int16) == want.view(torch.int16)) | want.isnan()
        assert ok.all(), f"{lay}: {(~ok).sum().item()} values differ, first at {(~ok).nonzero()[0].tolist()}"
