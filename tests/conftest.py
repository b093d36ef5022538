"""Shared test set-up: deterministic seeds, a small hypothesis profile, and float64
references written out from the papers' definitions (never from normlab's helpers)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "normlab",
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,
)
settings.load_profile("normlab")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


def ref_normalize(x: np.ndarray, axes: tuple[int, ...], eps: float, center: bool = True) -> np.ndarray:
    """(x - mean) / sqrt(var + eps) over ``axes`` in float64 numpy (biased variance);
    ``center=False`` is the RMS form x / sqrt(mean(x^2) + eps)."""
    x = np.asarray(x, dtype=np.float64)
    if center:
        mu = x.mean(axis=axes, keepdims=True)
        var = ((x - mu) ** 2).mean(axis=axes, keepdims=True)
        return (x - mu) / np.sqrt(var + eps)
    return x / np.sqrt((x**2).mean(axis=axes, keepdims=True) + eps)


def per_channel_np(v: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def assert_close(actual: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    expected_t = torch.as_tensor(np.asarray(expected) if not isinstance(expected, torch.Tensor) else expected)
    torch.testing.assert_close(actual.detach().double(), expected_t.double(), rtol=rtol, atol=atol)


@pytest.fixture(scope="module")
def one_thread():
    """Run a test module with one torch thread, restoring the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def forced_fast_path():
    """Force normlab's fused fast path on, whatever the input size."""
    from normlab.engine import fast_path

    with fast_path(True):
        yield


@pytest.fixture(params=["c-kernels", "torch-kernels"])
def kernel_mode(request):
    """Run a test on normlab's compiled CPU kernels and again on torch's kernels (the fallback
    where no C compiler is found). The first is skipped, with the reason, where they did not build."""
    from normlab import _kernels

    if request.param == "c-kernels" and not _kernels.available():
        pytest.skip(_kernels.status())
    with _kernels.enabled(request.param == "c-kernels"):
        yield request.param
