"""InputStandardizer: exact streaming statistics against numpy on the concatenated data."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab import InputStandardizer


def batches(seed: int = 0, n=(7, 1, 12, 3)) -> list[torch.Tensor]:
    """(k, 3, 5) float32 batches of unequal sizes, with a large offset and unequal spreads
    (a naive sum of squares would lose digits)."""
    rng = np.random.default_rng(seed)
    scale = np.array([2.0, 0.5, 3.0])[:, None]
    return [torch.from_numpy(rng.standard_normal((k, 3, 5)) * scale + 1e4).float() for k in n]


def test_standard_mode_matches_numpy_on_the_concatenated_data():
    data = batches()
    s = InputStandardizer(3, dim=1).fit(data)
    cat = np.concatenate([b.double().numpy() for b in data])
    mean = cat.mean(axis=(0, 2))
    std = cat.std(axis=(0, 2))
    np.testing.assert_allclose(s.mean.numpy(), mean, rtol=1e-14)
    np.testing.assert_allclose(s.std.numpy(), std, rtol=1e-10)
    assert int(s.count) == cat.shape[0] * cat.shape[2]
    x = data[2]
    y = s(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    np.testing.assert_allclose(y.double().numpy(), (x.double().numpy() - mean[:, None]) / std[:, None], atol=2e-3)
    z = s(torch.from_numpy(cat))
    np.testing.assert_allclose(z.numpy().mean(axis=(0, 2)), 0, atol=1e-8)
    np.testing.assert_allclose(z.numpy().var(axis=(0, 2)), 1, rtol=1e-8)


def test_fit_equals_many_partial_fits_and_one_tensor():
    data = batches(1)
    a = InputStandardizer(3).fit(data)
    b = InputStandardizer(3)
    for x in data:
        b.partial_fit(x)
    c = InputStandardizer(3).fit(torch.cat(data))
    d = InputStandardizer(3).fit(iter([(x, torch.zeros(len(x))) for x in data]))  # (x, y) batches, a generator
    for other in (b, c, d):
        for name in ("count", "mean", "m2", "data_min", "data_max"):
            torch.testing.assert_close(getattr(other, name), getattr(a, name), rtol=1e-12, atol=1e-9)
    # fit restarts, partial_fit accumulates
    a.fit(data[:1])
    assert int(a.count) == data[0].shape[0] * 5


def test_minmax_mode_and_inverse_on_sequence_windows():
    # the study runner's use: (N, L, 1) windows with the feature axis last
    rng = np.random.default_rng(2)
    series = torch.from_numpy(np.abs(rng.standard_normal((40, 24, 1))) * 80)
    s = InputStandardizer(1, dim=-1, mode="minmax").fit(series.split(16))
    y = s(series)
    assert float(y.min()) == pytest.approx(0.0, abs=1e-12) and float(y.max()) == pytest.approx(1.0, abs=1e-12)
    lo, hi = series.numpy().min(), series.numpy().max()
    np.testing.assert_allclose(y.numpy(), (series.numpy() - lo) / (hi - lo), rtol=1e-12)
    torch.testing.assert_close(s.inverse(y), series)
    st = InputStandardizer(1, dim=-1).fit(series)
    torch.testing.assert_close(st.inverse(st(series)), series)


def test_constant_feature_divides_by_eps_not_zero():
    x = torch.ones(10, 2)
    x[:, 1] = torch.arange(10.0)
    s = InputStandardizer(2, eps=1e-6).fit(x)
    y = s(x)
    assert torch.isfinite(y).all() and torch.equal(y[:, 0], torch.zeros(10))


def test_state_dict_round_trip_keeps_the_fit():
    data = batches(3)
    a = InputStandardizer(3).fit(data)
    b = InputStandardizer(3)
    b.load_state_dict(a.state_dict())
    assert b.fitted
    torch.testing.assert_close(b(data[0]), a(data[0]), rtol=0, atol=0)
    assert set(a.state_dict()) == {"count", "mean", "m2", "data_min", "data_max"}


def test_errors():
    s = InputStandardizer(3)
    with pytest.raises(RuntimeError, match=r"InputStandardizer\(3, dim=1\): not fitted"):
        s(torch.randn(2, 3))
    with pytest.raises(RuntimeError, match="not fitted"):
        s.inverse(torch.randn(2, 3))
    with pytest.raises(ValueError, match="expected 3 features along axis 1, got 4"):
        s.fit(torch.randn(5, 4))
    with pytest.raises(ValueError, match="got no data"):
        s.fit([])
    with pytest.raises(TypeError, match="floating-point"):
        s.fit(torch.ones(2, 3, dtype=torch.long))
    s.fit(torch.randn(4, 3))
    before = {k: v.clone() for k, v in s.state_dict().items()}
    with pytest.raises(ValueError, match="NaN"):
        s.partial_fit([torch.randn(2, 3), torch.full((2, 3), float("nan"))])
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="mode"):
        InputStandardizer(3, mode="robust")
    with pytest.raises(ValueError, match="dim"):
        InputStandardizer(3, dim=0)
