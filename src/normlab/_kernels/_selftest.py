"""The check a freshly loaded kernel library must pass before normlab uses it.

A few small computations on the library's own entry points (moments on both layouts and
both dtypes, and one affine map), each against the same computation in plain torch. The
outputs start as NaN, so a library whose functions do nothing (a stale or planted file)
fails, as does one that computes wrongly.
"""

from __future__ import annotations

import ctypes

import torch

_SUFFIX = {torch.float32: "f32", torch.float64: "f64"}


class SelfTestFailed(RuntimeError):
    """The library's results differ from torch's."""


def _ptr(t: torch.Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):  # NaN (untouched output) fails too
        raise SelfTestFailed(f"{what} differs from torch's by {(got - want).abs().max().item():.3g}")


def self_test(lib: ctypes.CDLL) -> None:
    """Raise :class:`SelfTestFailed` unless the library's kernels agree with plain torch."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 37, generator=g, dtype=torch.float64) * 2 + 1  # (N, C, L)
    want_mean = x.mean(2)
    want_m2 = ((x - want_mean.unsqueeze(2)) ** 2).sum(2)
    for dtype, suffix in _SUFFIX.items():
        for layout in ("cf", "cl"):
            v = (x if layout == "cf" else x.transpose(1, 2)).to(dtype).contiguous()
            mean = torch.full((3, 5), float("nan"), dtype=torch.float64)
            m2 = torch.full((3, 5), float("nan"), dtype=torch.float64)
            getattr(lib, f"nl_moments_{layout}_{suffix}")(_ptr(v), *v.shape, _ptr(mean), _ptr(m2), 1)
            _close(mean, want_mean, f"moments ({layout}, {dtype}): the mean")
            _close(m2 / 37, want_m2 / 37, f"moments ({layout}, {dtype}): M2")
    v = x.float().contiguous()
    out = torch.full_like(v, float("nan"))
    center, shift = (torch.randn(3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    scale = torch.randn(1, 5, generator=g, dtype=torch.float64)  # one row for every sample (rowmask bit 1)
    lib.nl_affine_cf_f32(_ptr(v), _ptr(out), *v.shape, _ptr(center), _ptr(scale), _ptr(shift), 0, 0.0, None, 2, 1)
    want = (x - center.unsqueeze(2)) * scale.unsqueeze(2) + shift.unsqueeze(2)
    _close(out.double(), want, "affine (cf, torch.float32)")
