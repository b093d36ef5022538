"""The statistics core against float64 numpy: moments, exact merges, the running rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from normlab import _moments
from normlab._moments import Moments


def _np_moments(x: np.ndarray, axes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    x = x.astype(np.float64)
    mu = x.mean(axis=axes, keepdims=True)
    return mu, ((x - mu) ** 2).mean(axis=axes, keepdims=True)


@given(
    shape=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    data=st.data(),
)
def test_mean_var_matches_float64_numpy(shape, data):
    dims = data.draw(st.lists(st.integers(0, len(shape) - 1), min_size=1, max_size=len(shape), unique=True))
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 1
    mean, var = _moments.mean_var(x, dims)
    mu, v = _np_moments(x.numpy(), tuple(dims))
    assert mean.shape == mu.shape and var.shape == v.shape
    np.testing.assert_allclose(mean.numpy(), mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var.numpy(), v, rtol=1e-12, atol=1e-12)


def test_negative_and_int_dims():
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    m1, v1 = _moments.mean_var(x, -1)
    m2, v2 = _moments.mean_var(x, (2,))
    torch.testing.assert_close(m1, m2)
    torch.testing.assert_close(v1, v2)


def test_moments_count_mean_m2():
    x = torch.randn(4, 3, 6, dtype=torch.float64)
    m = _moments.moments(x, (0, 2))
    assert m.count == 24
    mu, v = _np_moments(x.numpy(), (0, 2))
    np.testing.assert_allclose(m.mean.numpy(), mu, rtol=1e-12)
    np.testing.assert_allclose(m.m2.numpy(), v * 24, rtol=1e-12)
    np.testing.assert_allclose(m.var.numpy(), v, rtol=1e-12)
    np.testing.assert_allclose(m.unbiased_var.numpy(), v * 24 / 23, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_accumulate_in_float32(dtype):
    # 4096 values near 100: a float16 running sum would lose digits (and a sum of squares
    # in float16 overflows at 65504); float32 accumulation gives the exact moments.
    base = torch.randn(64, 64) * 0.5 + 100
    x = base.to(dtype)
    mean, var = _moments.mean_var(x, (0, 1))
    assert mean.dtype == torch.float32 and var.dtype == torch.float32
    ref = x.double()
    np.testing.assert_allclose(mean.item(), ref.mean().item(), rtol=1e-6)
    np.testing.assert_allclose(var.item(), ref.var(unbiased=False).item(), rtol=1e-4)
    assert _moments.accumulation_dtype(dtype) == torch.float32
    assert _moments.accumulation_dtype(torch.float64) == torch.float64


def test_large_mean_small_spread_keeps_precision():
    # mean 1e4 x std: E[x^2] - E[x]^2 in float32 cancels to noise; two passes do not.
    ref = np.random.default_rng(0).normal(1e4, 1.0, size=(8, 4, 256))
    x = torch.tensor(ref, dtype=torch.float32)
    mean, var = _moments.mean_var(x, (0, 2))
    mu, v = _np_moments(x.double().numpy(), (0, 2))  # float64 of the very float32 values
    np.testing.assert_allclose(mean.numpy(), mu, rtol=1e-6)
    np.testing.assert_allclose(var.numpy(), v, rtol=1e-3)
    # the naive float32 formula is far off here: this test can tell the two apart
    naive = (x * x).mean((0, 2), keepdim=True) - x.mean((0, 2), keepdim=True) ** 2
    assert np.max(np.abs(naive.numpy() - v) / v) > 1e-2


def _split_moments(x: torch.Tensor, sizes: list[int]) -> list[Moments]:
    parts = torch.split(x, sizes, dim=0)
    out = []
    for p in parts:
        if p.shape[0] == 0:
            z = torch.zeros(1, x.shape[1], dtype=x.dtype)
            out.append(Moments(0, z, z.clone()))
        else:
            out.append(_moments.moments(p, 0))
    return out


@given(sizes=st.lists(st.integers(0, 6), min_size=2, max_size=5).filter(lambda s: sum(s) > 1))
def test_merge_is_exact(sizes):
    x = torch.randn(sum(sizes), 3, dtype=torch.float64) * 2 + 5
    parts = _split_moments(x, sizes)
    acc = parts[0]
    for p in parts[1:]:
        acc = _moments.merge(acc, p)
    mu, v = _np_moments(x.numpy(), (0,))
    assert acc.count == sum(sizes)
    np.testing.assert_allclose(acc.mean.numpy(), mu, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(acc.var.numpy(), v, rtol=1e-10, atol=1e-12)


def test_merge_with_empty_sides():
    x = torch.randn(5, 2, dtype=torch.float64)
    m = _moments.moments(x, 0)
    z = torch.zeros_like(m.mean)
    empty = Moments(0, z, z.clone())
    for merged in (_moments.merge(m, empty), _moments.merge(empty, m)):
        torch.testing.assert_close(merged.mean, m.mean)
        torch.testing.assert_close(merged.m2, m.m2)
        assert merged.count == 5
    both = _moments.merge(empty, empty)
    assert both.count == 0 and torch.all(both.mean == 0) and torch.all(both.var == 0)


def test_reduce_moments_from_per_sample_channel():
    # per-(n, c) moments over the positions merge into per-channel batch moments exactly
    x = torch.randn(6, 4, 5, 7, dtype=torch.float64) * 3 - 2
    per_nc = _moments.moments(x, (2, 3))
    per_c = _moments.reduce_moments(per_nc, 0)
    mu, v = _np_moments(x.numpy(), (0, 2, 3))
    assert per_c.count == 6 * 35
    np.testing.assert_allclose(per_c.mean.numpy(), mu, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(per_c.var.numpy(), v, rtol=1e-12)
    # and into per-sample (layer norm) moments
    per_n = _moments.reduce_moments(per_nc, 1)
    mu, v = _np_moments(x.numpy(), (1, 2, 3))
    np.testing.assert_allclose(per_n.mean.numpy(), mu, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(per_n.var.numpy(), v, rtol=1e-12)


def test_reduce_moments_tensor_counts_with_zeros():
    # slots of different sizes, some empty (a rank with no samples): the result is the
    # moments of the union
    rng = np.random.default_rng(1)
    sizes = [3, 0, 5, 1, 0]
    chunks = [rng.normal(4, 2, size=(s, 2)) for s in sizes]
    means, m2s = [], []
    for c in chunks:
        if len(c):
            mu = c.mean(0)
            means.append(mu)
            m2s.append(((c - mu) ** 2).sum(0))
        else:
            means.append(np.full(2, 123.0))  # garbage in an empty slot must not matter
            m2s.append(np.zeros(2))
    m = Moments(
        torch.tensor(sizes, dtype=torch.float64)[:, None],
        torch.tensor(np.stack(means)),
        torch.tensor(np.stack(m2s)),
    )
    red = _moments.reduce_moments(m, 0)
    whole = np.concatenate(chunks)
    assert torch.all(red.count == 9)
    np.testing.assert_allclose(red.mean.numpy()[0], whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(red.var.numpy()[0], whole.var(0), rtol=1e-12)
    np.testing.assert_allclose(red.unbiased_var.numpy()[0], whole.var(0, ddof=1), rtol=1e-12)


def test_running_factor():
    assert _moments.running_factor(0.1, None) == 0.1
    nbt = torch.tensor(4)
    assert float(_moments.running_factor(None, nbt, torch.float64)) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        _moments.running_factor(None, None)


def test_update_running_stats_momentum_and_unbiased_var():
    x = torch.randn(10, 3, dtype=torch.float64)
    m = _moments.moments(x, 0)
    rm, rv = torch.full((3,), 2.0, dtype=torch.float64), torch.full((3,), 3.0, dtype=torch.float64)
    _moments.update_running_stats(rm, rv, m, 0.1)
    xn = x.numpy()
    np.testing.assert_allclose(rm.numpy(), 0.9 * 2 + 0.1 * xn.mean(0), rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), 0.9 * 3 + 0.1 * xn.var(0, ddof=1), rtol=1e-12)


def test_cumulative_average_with_momentum_none():
    batches = [torch.randn(n, 2, dtype=torch.float64) + i for i, n in enumerate([4, 7, 3])]
    rm, rv = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    nbt = torch.tensor(0)
    for b in batches:
        nbt += 1
        _moments.update_running_stats(rm, rv, _moments.moments(b, 0), _moments.running_factor(None, nbt, torch.float64))
    np.testing.assert_allclose(rm.numpy(), np.mean([b.numpy().mean(0) for b in batches], 0), rtol=1e-12)
    np.testing.assert_allclose(rv.numpy(), np.mean([b.numpy().var(0, ddof=1) for b in batches], 0), rtol=1e-12)


def test_update_skips_missing_buffers_and_detaches():
    x = torch.randn(5, 2, requires_grad=True)
    m = _moments.moments(x, 0)
    rv = torch.ones(2)
    _moments.update_running_stats(None, rv, m, 0.5)
    assert not rv.requires_grad
    np.testing.assert_allclose(rv.numpy(), 0.5 + 0.5 * x.detach().numpy().var(0, ddof=1), rtol=1e-6)
