"""The kernels' streaming (non-temporal) stores for large float32/float64 outputs
(``kernels.c``: streams, stream_copy, STREAMED): forced on for small tensors, the affine and
input-gradient passes and the per-sample fused pair (both layouts, every activation epilogue,
in place, kept dy', outputs that start off a cache line, rows longer than a streamed chunk)
write exactly what the plain stores write, and the formulas' float64 values."""

from __future__ import annotations

import pytest
import torch

from _helpers import assert_streaming_changes_nothing
from normlab import _kernels

pytestmark = pytest.mark.skipif(not _kernels.available(), reason=_kernels.status())

# positions / channels below, at and above the streamed chunk (256 values), and odd ones
# (2, 1100, 3), (2, 2100, 3): channels-last rows wider than a run's buffer (8 kB) in float64, in both
SHAPES = [(2, 3, 7), (2, 5, 256), (3, 4, 700), (2, 300, 5), (1, 513, 3), (2, 1100, 3), (2, 2100, 3)]
EPILOGUES = [None, ("relu",), ("leaky_relu", 0.2), ("silu",), ("gelu",), ("tlu",)]


def _epilogue(spec, n, c):
    if spec is None:
        return None
    code = _kernels.EPILOGUES["leaky_relu" if spec[0] == "relu" else spec[0]]
    if spec[0] == "tlu":  # a per-(n, c) threshold
        return _kernels.Epilogue(code, 0.0, torch.randn(n, c, dtype=torch.float64))
    return _kernels.Epilogue(code, spec[1] if len(spec) > 1 else 0.0)


def _offset(t: torch.Tensor, by: int) -> torch.Tensor:
    """A contiguous tensor like ``t`` whose data starts ``by`` elements into its storage (off a
    64-byte line for by = 1)."""
    flat = torch.empty(t.numel() + by, dtype=t.dtype)
    out = flat[by:].view(t.shape)
    out.copy_(t)
    return out


def _passes(x, dy, layout, coefs, act, off):
    center, scale, shift, a, b, k = coefs
    y = _offset(torch.zeros_like(x), off)
    _kernels.affine(x, y, layout, center, scale, shift, act=act)
    dx = _offset(torch.zeros_like(x), off)
    kept = act is not None and act[0] in (2, 3)  # SiLU, GELU: the sums pass keeps dy' in dx
    if kept:
        _kernels.reduce(dy, x, layout, center, act, scale, shift, keep=dx)
    _kernels.dx(dy, x, dx, layout, center, a, b, k, act, scale, shift, kept=kept)
    inplace = x.clone()
    _kernels.affine(inplace, inplace, layout, center, scale, shift, act=act)
    return y, dx, inplace


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("act", EPILOGUES, ids=lambda a: "none" if a is None else a[0])
def test_streamed_outputs_equal_plain_stores(dtype, layout, shape, act):
    n, c, length = shape
    g = torch.Generator().manual_seed(sum(shape))
    sh = (n, c, length) if layout == "cf" else (n, length, c)
    x = torch.randn(sh, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(sh, generator=g, dtype=torch.float64).to(dtype)
    coefs = [torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(6)]
    ep = _epilogue(act, n, c)
    streamed = assert_streaming_changes_nothing(lambda off: _passes(x, dy, layout, coefs, ep, off))
    if act is None:  # and the values themselves, against the formulas in float64
        center, scale, shift, a, b, k = (t.to(dtype).double() for t in coefs)
        nc = (lambda t: t.unsqueeze(2)) if layout == "cf" else (lambda t: t.unsqueeze(1))
        xd, dyd = x.double(), dy.double()
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(streamed[0].double(), (xd - nc(center)) * nc(scale) + nc(shift), **tol)
        torch.testing.assert_close(streamed[1].double(), nc(a) * dyd + nc(b) * (xd - nc(center)) + nc(k), **tol)


def test_streaming_threshold_is_restored():
    with _kernels.streaming(0):
        with _kernels.streaming(-1):
            pass
        x = torch.randn(2, 3, 300)
        y = torch.empty_like(x)
        ones = torch.ones(2, 3, dtype=torch.float64)
        _kernels.affine(x, y, "cf", ones * 0, ones, ones * 0)
        assert torch.equal(y, x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("shape,groups", [((4, 6, 7), 2), ((4, 4, 300), 1), ((3, 300, 5), 3), ((4, 6, 50), 6),
                                         ((4, 2100, 3), 3)])
@pytest.mark.parametrize("act", EPILOGUES, ids=lambda a: "none" if a is None else a[0])
def test_streamed_group_passes_equal_plain_stores(dtype, layout, shape, groups, act):
    n, c, length = shape
    g = torch.Generator().manual_seed(sum(shape) + groups)
    sh = (n, c, length) if layout == "cf" else (n, length, c)
    x = torch.randn(sh, generator=g, dtype=torch.float64).to(dtype)
    dy = torch.randn(sh, generator=g, dtype=torch.float64).to(dtype)
    w, b = torch.randn(c, generator=g, dtype=dtype), torch.randn(c, generator=g, dtype=dtype)
    ep = _epilogue(act, n, c)

    def passes(off):
        y, dx = _offset(torch.zeros_like(x), off), _offset(torch.zeros_like(x), off)
        _, _, ctr, rstd = _kernels.group_forward(x, y, layout, groups, 1e-5, True, w, b, ep)
        sums = _kernels.group_backward(dy, x, dx, layout, groups, True, w, ctr, rstd, b, ep)
        return (y, dx, *sums)

    assert_streaming_changes_nothing(passes)
