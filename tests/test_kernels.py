"""normlab's compiled CPU kernels (normlab._kernels) against float64 references computed here
with torch ops, on both layouts, both dtypes and awkward shapes (one channel, channel counts
that are not a multiple of the register block, one position, blocks that do not divide the
positions, one sample, a mean 1e4 times the spread); and the build: cached across processes,
switched off by NORMLAB_KERNELS=0, and a clean fallback when no compiler works."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from normlab import _kernels

pytestmark = pytest.mark.skipif(not _kernels.available(), reason=_kernels.status())

# (2, 70, 600): channels-last blocks of rows merged with a partial channel block (70 = 64 + 6)
SHAPES = [(3, 5, 7), (1, 1, 1), (2, 1, 600), (4, 3, 1), (2, 70, 33), (3, 200, 9), (1, 16, 4099), (5, 64, 130),
          (2, 70, 600)]


def _data(shape, dtype, layout, far=False, seed=0):
    """A (N, C, L) reference tensor and its kernel view ((N, C, L) cf or (N, L, C) cl)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 0.7 + 0.3
    if far:
        x = x + 1e4 * 0.7  # mean 1e4 times the standard deviation
    ref = x.to(dtype).double()  # the values the kernel sees
    v = x.to(dtype) if layout == "cf" else x.to(dtype).transpose(1, 2).contiguous()
    return ref, v


def _as_ref(t: torch.Tensor, layout: str) -> torch.Tensor:
    return t.double() if layout == "cf" else t.transpose(1, 2).double()


def _tol(dtype):
    """An output computed in float32 (float64) and rounded once to ``dtype``."""
    if dtype in (torch.bfloat16, torch.float16):
        return dict(rtol=2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11, atol=1e-5)
    return dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("far", [False, True])
def test_moments_match_a_float64_two_pass_reference(layout, dtype, shape, far):
    ref, v = _data(shape, dtype, layout, far)
    mean, m2 = _kernels.moments(v, layout)
    want_mean = ref.mean(2)
    want_m2 = ((ref - want_mean.unsqueeze(2)) ** 2).sum(2)
    # the mean to a float32 rounding of the spread (std 0.7), not of the mean itself
    atol = (1e-12 if not far else 1e-9) if dtype == torch.float64 else 1e-6
    torch.testing.assert_close(mean, want_mean, rtol=1e-13, atol=atol)
    # M2 relative to its own size: the float32 accumulators keep ~1e-6 of it even at mean = 1e4 std
    scale = want_m2.abs() + 1e-30
    rel = 1e-12 if dtype == torch.float64 else 3e-6
    assert ((m2 - want_m2).abs() <= rel * scale + 1e-12).all(), ((m2 - want_m2).abs() / scale).max()


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_affine_reduce_and_dx_match_their_formulas(layout, dtype, shape):
    """Against the formulas in float64 (odd row lengths included: the 16-bit types go two values a
    32-bit word, an odd last value alone)."""
    ref, v = _data(shape, dtype, layout, seed=1)
    dref, dv = _data(shape, dtype, layout, seed=2)
    n, c, _ = shape
    g = torch.Generator().manual_seed(3)
    center, scale, shift, a, b, k = (torch.randn(n, c, generator=g, dtype=torch.float64) for _ in range(6))
    arith = torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype  # the coefficients' type there
    cast = lambda t: t.to(arith).double().unsqueeze(2)  # noqa: E731

    y = torch.empty_like(v)
    _kernels.affine(v, y, layout, center, scale, shift)
    want_y = (ref - cast(center)) * cast(scale) + cast(shift)
    torch.testing.assert_close(_as_ref(y, layout), want_y, **_tol(dtype))
    yi = v.clone()  # in place
    _kernels.affine(yi, yi, layout, center, scale, shift)
    torch.testing.assert_close(_as_ref(yi, layout), want_y, **_tol(dtype))

    gs, hs = _kernels.reduce(dv, v, layout, center)
    sums = dict(rtol=1e-12, atol=1e-4) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)  # (float accumulators)
    torch.testing.assert_close(gs, dref.sum(2), **sums)
    torch.testing.assert_close(hs, (dref * (ref - cast(center))).sum(2), **sums)

    dx = torch.empty_like(v)
    _kernels.dx(dv, v, dx, layout, center, a, b, k)
    want = cast(a) * dref + cast(b) * (ref - cast(center)) + cast(k)
    torch.testing.assert_close(_as_ref(dx, layout), want, **_tol(dtype))


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("act", [None, "silu", "tlu"])
def test_coefficients_as_rows_equal_the_same_as_full_arrays(layout, dtype, act):
    """The passes take a per-channel coefficient as one (1, C) row (or a (C,) vector, or a row
    expanded to (N, C)) that the kernels repeat over the samples, with no copy made in Python
    (``_coefs``' mask): the outputs and sums are those of the same values as (N, C) arrays, bit for
    bit, in every pass (EvoNorm's too), whichever coefficients are rows."""
    from normlab._kernels import evonorm

    n, c = 3, 70
    _, v = _data((n, c, 37), dtype, layout, seed=4)
    _, dv = _data((n, c, 37), dtype, layout, seed=5)
    g = torch.Generator().manual_seed(6)
    rows = [torch.randn(1, c, generator=g, dtype=torch.float64) for _ in range(8)]
    forms = [rows[0], rows[1].reshape(c), rows[2].expand(n, c), rows[3], rows[4].reshape(c), rows[5].expand(n, c),
             rows[6], rows[7].float()]  # (1, C), (C,), a stride-0 (N, C) view, ..., float32 (converted)
    full = [r.expand(n, c).contiguous() for r in rows]
    mixed = [f if i % 2 else full[i] for i, f in enumerate(forms)]  # some rows, some full arrays
    code = None if act is None else _kernels.Epilogue(_kernels.EPILOGUES[act], 0.0,
                                                      rows[7].reshape(c) if act == "tlu" else None)
    code_full = None if act is None else code._replace(threshold=None if act != "tlu" else full[7])

    def run(cs, ep):
        y, dx, dx_ev = torch.empty_like(v), torch.empty_like(v), torch.empty_like(v)
        _kernels.affine(v, y, layout, cs[0], cs[1], cs[2], act=ep)
        sums = _kernels.reduce(dv, v, layout, cs[0], ep, cs[1], cs[2])
        _kernels.dx(dv, v, dx, layout, cs[0], cs[3], cs[4], cs[5], ep, cs[1], cs[2])
        vv = rows[6].reshape(c).abs()
        y_ev = torch.empty_like(v)
        evonorm.evonorm_forward("b0", v, y_ev, layout, vv, cs[6].abs() + 1, cs[0].abs() + 1, cs[1], cs[2])
        s_ev = evonorm.evonorm_reduce("b0", dv, v, layout, vv, cs[6].abs() + 1, cs[0].abs() + 1)
        evonorm.evonorm_dx("b0", dv, v, dx_ev, layout, vv, cs[6].abs() + 1, cs[0].abs() + 1, cs[3], cs[4], cs[5], None)
        return [y, *sums, dx, y_ev, s_ev, dx_ev]

    want = run(full, code_full)
    for cs in (forms, mixed):
        for got, ref in zip(run(cs, code), want):
            assert torch.equal(got, ref)
    # which forms went as rows (no copy) and which were converted (held): the float32 row is
    # converted to a float64 row and still goes as a row; the 0-d tensor is expanded to (N, C)
    held, _, mask = _kernels._coefs([*forms[:3], full[0], forms[7], torch.tensor(2.0, dtype=torch.float64)], n, c)
    assert mask == 0b10111 and len(held) == 2
    assert held[0].dtype == torch.float64 and held[0].shape == (1, c) and torch.equal(held[0], forms[7].double())
    assert torch.equal(held[1], torch.full((n, c), 2.0, dtype=torch.float64))


def test_affine_in_place():
    ref, v = _data((3, 4, 50), torch.float32, "cf")
    ones = torch.ones(3, 4, dtype=torch.float64)
    _kernels.affine(v, v, "cf", ones, 2 * ones, ones)
    torch.testing.assert_close(v.double(), (ref - 1) * 2 + 1)


GROUP_CASES = [((4, 6, 50), 1), ((4, 6, 50), 2), ((4, 6, 50), 6), ((6, 70, 33), 7), ((4, 1, 9), 1),
               ((4, 200, 5), 50), ((2, 4, 5000), 2)]


def _group_ref(ref, groups, center, w, b):
    """Group (or RMS) norm of a float64 (N, C, L) tensor, written out."""
    n, c, length = ref.shape
    xg = ref.reshape(n, groups, -1)
    if center:
        mu = xg.mean(2, keepdim=True)
        out = ((xg - mu) / torch.sqrt(((xg - mu) ** 2).mean(2, keepdim=True) + 1e-5)).reshape(n, c, length)
    else:
        out = (xg / torch.sqrt((xg * xg).mean(2, keepdim=True) + 1e-5)).reshape(n, c, length)
    if w is not None:
        out = out * w.view(1, -1, 1)
    return out + b.view(1, -1, 1) if b is not None else out


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,groups", GROUP_CASES)
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_group_forward_matches_group_and_rms_norm(layout, dtype, shape, groups, center, affine):
    ref, v = _data(shape, dtype, layout, far=center)  # centred: mean 1e4 x std as well
    c = shape[1]
    w = torch.rand(c, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(c, dtype=torch.float64) if affine and center else None
    y = torch.empty_like(v)
    mean, m2, ctr, rstd = _kernels.group_forward(v, y, layout, groups, 1e-5, center, w, b)
    from normlab._moments import group_moments

    want_ctr, want_var = group_moments(mean, m2, shape[2], groups, center)
    want_rstd = torch.rsqrt(want_var + 1e-5)
    torch.testing.assert_close(ctr, want_ctr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd, want_rstd, rtol=1e-10, atol=0)
    # float32 at mean = 1e4 x std: x itself is quantized to 4.9e-4 (7e-4 of a std) and the
    # float32 centre to half that, so the normalized output is good to about 1e-3 there
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3 if center else 1e-5)
    torch.testing.assert_close(_as_ref(y, layout), _group_ref(ref, groups, center, w, b), **tol)
    torch.testing.assert_close(mean, ref.mean(2), rtol=1e-12, atol=1e-9 if dtype == torch.float64 else 1e-6)
    want_m2 = ((ref - ref.mean(2, keepdim=True)) ** 2).sum(2)
    torch.testing.assert_close(m2, want_m2, rtol=3e-6 if dtype == torch.float32 else 1e-10, atol=1e-9)


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,groups", GROUP_CASES)
@pytest.mark.parametrize("center", [True, False])
def test_group_forward_without_channel_moments_gives_the_same_statistics(layout, dtype, shape, groups, center):
    """Without the per-(n, c) moments a contiguous group (every channel-first one, channels-last
    with one group) is one row of the moments kernel: the same centre, 1/std and output as
    the per-channel merge, also at mean = 1e4 x std."""
    ref, v = _data(shape, dtype, layout, far=center)
    c = shape[1]
    w, b = torch.rand(c, dtype=torch.float64) + 0.5, torch.randn(c, dtype=torch.float64)
    y, y2 = torch.empty_like(v), torch.empty_like(v)
    _, _, ctr, rstd = _kernels.group_forward(v, y, layout, groups, 1e-5, center, w, b)
    mean, m2, ctr2, rstd2 = _kernels.group_forward(v, y2, layout, groups, 1e-5, center, w, b, channel_moments=False)
    assert mean is None and m2 is None
    torch.testing.assert_close(ctr2, ctr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rstd2, rstd, rtol=1e-6 if dtype == torch.float32 else 1e-11, atol=0)  # (float32 block sums)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-3 if center else 1e-5)
    torch.testing.assert_close(y2, y, **tol)
    torch.testing.assert_close(_as_ref(y2, layout), _group_ref(ref, groups, center, w, b if center else None) if center
                               else _group_ref(ref, groups, center, w, None) + b.view(1, -1, 1),
                               **(dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else tol))


@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("shape,groups", GROUP_CASES)
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_group_backward_matches_autograd_of_the_reference(layout, shape, groups, center, affine):
    ref, v = _data(shape, torch.float64, layout, seed=4)
    dref, dv = _data(shape, torch.float64, layout, seed=5)
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_() if affine else None
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if affine and center else None
    xr = ref.clone().requires_grad_()
    want = _group_ref(xr, groups, center, w, b)
    wrt = [xr] + [t for t in (w, b) if t is not None]
    grads = torch.autograd.grad(want, wrt, dref)
    # the forward's statistics, as the layer passes them
    y = torch.empty_like(v)
    ctr, rstd = _kernels.group_forward(v, y, layout, groups, 1e-5, center, w, b)[2:]
    dx = torch.empty_like(v)
    g, h = _kernels.group_backward(dv, v, dx, layout, groups, center, w, ctr, rstd)
    torch.testing.assert_close(_as_ref(dx, layout), grads[0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(g, dref.sum(2), rtol=1e-10, atol=1e-10)
    if w is not None:
        torch.testing.assert_close((rstd * h).sum(0), grads[1], rtol=1e-9, atol=1e-10)


def test_kernels_use_every_thread_count_alike():
    # the work split changes with the thread count; the results may not (fixed summation order
    # within a block, and blocks merged in the same order)
    ref, v = _data((6, 64, 1000), torch.float32, "cl")
    before = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            out.append(_kernels.moments(v, "cl"))
    finally:
        torch.set_num_threads(before)
    for mean, m2 in out[1:]:
        assert torch.equal(mean, out[0][0]) and torch.equal(m2, out[0][1])


def test_rejects_a_view_that_is_not_contiguous():
    v = torch.randn(3, 4, 5).transpose(1, 2)
    with pytest.raises(ValueError, match="contiguous 3-d view"):
        _kernels.moments(v, "cf")


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **env}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=full_env,
                          timeout=300)


CHECK = """
    import torch, normlab
    from normlab import _kernels
    from normlab.functional import fast_path
    x = torch.randn(8, 6, 20, 20, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with fast_path(True):
        y = normlab.functional.group_norm(x, 3)
    ref = torch.nn.functional.group_norm(x.contiguous(), 3)
    assert torch.allclose(y, ref, atol=1e-10), (y - ref).abs().max()
    print(_kernels.available(), _kernels.status())
"""


@pytest.mark.slow
def test_without_a_compiler_the_fast_paths_fall_back(tmp_path):
    res = _run(CHECK, CC="/nonexistent/cc", PATH="/nonexistent", NORMLAB_CACHE=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("False normlab CPU kernels unavailable: no C compiler found"), res.stdout


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["every unit", "one unit"])
def test_a_failing_compiler_falls_back_and_says_why(tmp_path, failing):
    # the four units compile at once: one that fails stops the build (the others are killed),
    # nothing is left in the cache, and torch's kernels run with the compiler's message shown
    cc = tmp_path / "cc"
    cond = '*' if failing == "every unit" else '*-DNL_UNIT=3*'
    cc.write_text(f"""#!/bin/sh
case "$*" in --version) echo fake-cc 1.0; exit 0;; esac
case "$*" in {cond}) echo "boom: cannot compile" >&2; exit 1;; esac
sleep 37.5 && exit 0
""")
    cc.chmod(0o700)
    cache = tmp_path / "cache"
    res = _run(CHECK, CC=str(cc), NORMLAB_CACHE=str(cache))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("False normlab CPU kernels unavailable: ") and "boom: cannot compile" in res.stdout, \
        res.stdout
    assert list(cache.iterdir()) == []
    time.sleep(0.5)
    left = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert str(cc) not in left and "sleep 37.5" not in left  # the others stopped, with what they started


@pytest.mark.slow
def test_switched_off_by_the_environment(tmp_path):
    res = _run(CHECK, NORMLAB_KERNELS="0", NORMLAB_CACHE=str(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("False normlab CPU kernels turned off by NORMLAB_KERNELS=0"), res.stdout
    assert not list(tmp_path.iterdir())  # nothing built


@pytest.mark.slow
def test_built_once_and_reused_by_later_processes(tmp_path):
    first = _run(CHECK, NORMLAB_CACHE=str(tmp_path))
    assert first.returncode == 0 and first.stdout.startswith("True"), first.stderr
    built = list(tmp_path.glob("normlab_kernels_*.so"))
    assert len(built) == 1 and not list(tmp_path.glob("*.tmp*")) and not list(tmp_path.glob("build-*"))
    stamp = built[0].stat().st_mtime_ns
    second = _run(CHECK, NORMLAB_CACHE=str(tmp_path))
    assert second.returncode == 0 and second.stdout.startswith("True"), second.stderr
    assert built[0].stat().st_mtime_ns == stamp and list(tmp_path.glob("normlab_kernels_*.so")) == built


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,c", [(1, 1), (7, 10), (9, 7), (130, 768), (3, 5000), (2, 9001)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("center", [True, False])
def test_row_norm_forward_and_backward_match_float64_autograd(dtype, rows, c, affine, center):
    """Layer norm (center) and RMS norm of each row against float64 autograd on the same rounded
    input: rows of odd and even length (bfloat16 pairs values by words), longer than a chunk
    (CF_CHUNK, 4096), fewer and more than a block of rows, and a mean far from zero."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, c, generator=g, dtype=torch.float64) * 2 + (30.0 if center else 0.5)
    dy = torch.randn(rows, c, generator=g, dtype=torch.float64)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine and center else None
    xr = x.to(dtype).double().requires_grad_()
    wr = w.clone().requires_grad_() if affine else None
    br = b.clone().requires_grad_() if b is not None else None
    ctr = xr - xr.mean(1, keepdim=True) if center else xr
    want = ctr * torch.rsqrt((ctr * ctr).mean(1, keepdim=True) + 1e-6)
    want = want * wr if affine else want
    want = want + br if br is not None else want
    wrt = [xr] + [t for t in (wr, br) if t is not None]
    grads = torch.autograd.grad(want, wrt, dy.to(dtype).double())
    xv, dv = x.to(dtype), dy.to(dtype)
    y, dx = torch.empty_like(xv), torch.empty_like(xv)
    mean, rstd = _kernels.rows_forward(xv, y, 1e-6, w, b, center)
    dw, db = _kernels.rows_backward(dv, xv, dx, w, mean, rstd, affine, b is not None)
    if dtype == torch.float64:
        tol = dict(rtol=1e-10, atol=1e-10)
    elif dtype == torch.float32:
        tol = dict(rtol=1e-4, atol=1e-4)
    else:  # (the output rounded to the half type: half an ulp, 2^-8 or 2^-11 relative)
        tol = dict(rtol=1e-2 if dtype == torch.bfloat16 else 2e-3, atol=2e-2 if dtype == torch.bfloat16 else 3e-3)
    torch.testing.assert_close(y.double(), want.detach(), **tol)
    torch.testing.assert_close(dx.double(), grads[0], **tol)
    assert (mean is None) == (not center)
    sums = dict(rtol=1e-9, atol=1e-8) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-3)
    if affine:
        torch.testing.assert_close(dw, grads[1], **sums)
    else:
        assert dw is None
    if b is not None:
        torch.testing.assert_close(db, grads[2], **sums)
    else:
        assert db is None


@pytest.mark.parametrize("c", [64, 768, 5000])
def test_row_layer_norm_at_a_far_mean_matches_float64(c):
    """Mean 1e4 x the spread in float32: the rows' two-pass sums keep the variance (E[x^2] - E[x]^2
    would give errors of order 1-100); what is left is the float32 input's own spacing near 1e4
    (1e-3 of a spread) and the mean's rounding, as in torch's layer norm (about 2e-3 both)."""
    x = (torch.randn(64, c, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) + 1e4).float()
    xd = x.double()
    want = (xd - xd.mean(1, keepdim=True)) * torch.rsqrt(xd.var(1, unbiased=False, keepdim=True) + 1e-5)
    y = torch.empty_like(x)
    _kernels.rows_forward(x, y, 1e-5, None, None, True)
    torch.testing.assert_close(y.double(), want, rtol=0, atol=6e-3)


# ----------------------------------------------- the per-sample norms on the compiled kernels
@pytest.mark.parametrize("groups", [1, 2, 6])
@pytest.mark.parametrize("layout", ["cf", "cl", "seq", "2d"])
@pytest.mark.parametrize("center,need_moments", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("n", [1, 5])  # channels-last: split over threads, or one sample per item
def test_group_norm_kernel_gradcheck_and_torch_reference(groups, layout, center, need_moments, n):
    from normlab import engine

    x = torch.randn(n, 6, 3, 5, dtype=torch.float64) * 2 + 1
    cd = 1
    if layout == "cl":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "seq":
        x, cd = torch.randn(n, 7, 6, dtype=torch.float64) * 2 + 1, -1
    elif layout == "2d":  # no positions: taken as (N, 1, C) by the kernels
        if groups == 6:
            pytest.skip("one value per group: the layers take the plain path (the output is exactly 0)")
        x = torch.randn(n, 6, dtype=torch.float64) * 2 + 1
    x.requires_grad_()
    w = (torch.rand(6, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(6, dtype=torch.float64).requires_grad_()
    b = b if center else None
    cd = cd % x.ndim

    def run(x, w, b):
        desc = engine.GroupStats(groups, 1e-5, center)
        desc.keeps_moments = need_moments
        y = engine.run(desc, x, cd, (w, b) if center else (w,))
        if not need_moments or layout == "2d" and groups == 1:  # (the row passes keep no per-(n, c) moments)
            return y, None, None
        return y, desc.mean_nc, desc.m2_nc / desc.count_nc

    f = lambda x, w, b: run(x, w, b)[0]  # noqa: E731
    assert torch.autograd.gradcheck(f, (x, w, b) if center else (x, w, None))
    xm = x.detach().movedim(cd, 1)
    if center:
        ref = torch.nn.functional.group_norm(xm, groups, w.detach(), b.detach(), 1e-5)
    else:
        xg = xm.reshape(n, groups, -1)
        ref = (xg * torch.rsqrt((xg * xg).mean(2, keepdim=True) + 1e-5)).reshape(xm.shape)
        ref = ref * w.detach().view([1, -1] + [1] * (xm.ndim - 2))
    y, mean, var = run(x, w, b)
    torch.testing.assert_close(y.movedim(cd, 1), ref, rtol=1e-10, atol=1e-10)
    assert y.stride() == x.stride()
    if mean is not None:  # per-(n, c) moments, for instance norm's running statistics
        if xm.ndim == 2:  # one value per (n, c)
            torch.testing.assert_close(mean, xm, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(var, torch.zeros_like(xm), rtol=0, atol=1e-12)
            return
        dims = tuple(d for d in range(2, xm.ndim))
        torch.testing.assert_close(mean, xm.mean(dims), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, ((xm - xm.mean(dims, keepdim=True)) ** 2).mean(dims), rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_compile_in_a_fresh_process_before_any_eager_call():
    # the first use of the kernels may come from inside torch.compile's tracing: it must not
    # load (a lock) or call them there, but take the traceable plain path
    code = """
        import torch, normlab
        x = torch.randn(4, 8, 16, 16)
        for spec in ("bn", "gn:2", "sn", "bin", "rmsc"):
            kw = {"channel_dim": -1} if spec == "rmsc" else {}
            m = normlab.make_norm(spec, 8, **kw)
            xx = x.movedim(1, -1).contiguous() if kw else x
            y = torch.compile(m, fullgraph=True)(xx)
            assert torch.allclose(y, m(xx), atol=1e-5), spec
        print("ok")
    """
    res = _run(code)  # (the usual cache: a fresh process, not a fresh build, is the point)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@pytest.mark.parametrize("shape,fmt", [((5, 3, 4, 6), None), ((5, 3, 4, 6), torch.channels_last), ((7, 5), None)])
def test_batch_norm_kernel_in_both_layouts(shape, fmt):
    # the engine's batch norm in both layouts (channel-first (N, C, L); channels-last and (M, C)
    # as (N, L, C)), against torch and by gradcheck
    from normlab import engine

    x = torch.randn(shape, dtype=torch.float64) * 2 + 3
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    c = shape[1]
    w = (torch.rand(c, dtype=torch.float64) + 0.5).requires_grad_()
    b = torch.randn(c, dtype=torch.float64, requires_grad=True)

    def f(x, w, b):
        return engine.run(engine.BatchStats(1e-5), x, 1, (w, b))

    assert torch.autograd.gradcheck(f, (x, w, b))
    ref = torch.nn.functional.batch_norm(x, None, None, w, b, True, 0.0, 1e-5)
    torch.testing.assert_close(f(x, w, b), ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn(shape, dtype=torch.float64)
    got = torch.autograd.grad(f(x, w, b), (x, w, b), dy)
    want = torch.autograd.grad(ref, (x, w, b), dy)
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-10)
