"""Bindings of the element-wise kernels (``elementwise_impl.h``, ``mathfn.h``): Dynamic Tanh
and Dynamic erf, ``y = w_c * f(alpha * x + s) + b_c`` with f = tanh or erf, in one pass
forward (read x, write y) and one back (read dy and x, write dx, and sum the parameters'
gradients on the way). Layouts: "cl", rows of an (M, C) matrix (channel axis last), and
"cf", an (N, C, L) view (channel-first). Half-precision tensors are read and written in
their type and computed in float32; float64 calls libm's functions.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import _SUFFIX, _check, _lib, _opt, _ptr

__all__ = ["KINDS", "declare", "squash_forward", "squash_backward", "math_function"]

KINDS = {"tanh": 0, "erf": 1}
"""The squashing functions f, by name, as the kernels number them."""

MATH_FUNCTIONS = {"exp": 0, "tanh": 1, "erf": 2, "sigmoid": 3, "exp_act": 4, "gelu": 5, "gelu_grad": 6,
                  "gelu_half": 7, "gelu_grad_half": 8, "tanh_half": 9, "erf_half": 10}


def declare(lib: ctypes.CDLL) -> None:
    """Set the argument types of the element-wise entry points (called when the library loads)."""
    p, i, n, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for s in _SUFFIX.values():
        for name, args in ((f"nl_squash_fwd_cl_{s}", [p, p, i, i, n, d, d, p, p, n]),
                           (f"nl_squash_fwd_cf_{s}", [p, p, i, i, i, n, d, d, p, p, n]),
                           (f"nl_squash_bwd_cl_{s}", [p, p, p, i, i, n, d, d, p, p, p, p, n]),
                           (f"nl_squash_bwd_cf_{s}", [p, p, p, i, i, i, n, d, d, p, p, p, p, n])):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        fn = getattr(lib, f"nl_mathfn_{s}")
        fn.argtypes, fn.restype = [p, p, i, n], None


def _shape(v: Tensor, layout: str) -> tuple[int, ...]:
    want = 2 if layout == "cl" else 3
    if v.ndim != want or not v.is_contiguous():
        raise ValueError(f"normlab element-wise kernels ({layout}) expect a contiguous {want}-d view, "
                         f"got shape {tuple(v.shape)}")
    return tuple(v.shape)


def _vector(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A per-channel parameter rounded to the input's type (as the plain path computes), in float64."""
    return _opt(None if t is None else t.detach().to(dtype))


def _nullable(t: Tensor | None) -> ctypes.c_void_p | None:
    return None if t is None else _ptr(t)


def squash_forward(v: Tensor, out: Tensor, layout: str, kind: str, alpha: float, shift: float,
                   weight: Tensor | None, bias: Tensor | None) -> None:
    """``out = weight * f(alpha * v + shift) + bias`` on a contiguous (M, C) ("cl") or (N, C, L)
    ("cf") view; ``weight``/``bias`` of length C or None (1 and 0)."""
    dims = _shape(v, layout)
    _shape(out, layout)
    w, b = _vector(weight, v.dtype), _vector(bias, v.dtype)
    fn = getattr(_lib(), f"nl_squash_fwd_{layout}_{_SUFFIX[v.dtype]}")
    _check(fn(_ptr(v), _ptr(out), *dims, KINDS[kind], float(alpha), float(shift), _nullable(w), _nullable(b),
              torch.get_num_threads()), f"squash_fwd_{layout}")


def squash_backward(dy: Tensor, v: Tensor, out: Tensor, layout: str, kind: str, alpha: float, shift: float,
                    weight: Tensor | None) -> tuple[Tensor, Tensor, float, float]:
    """The input gradient of :func:`squash_forward` into ``out``; returns, in float64, the
    per-channel ``sum dy * f(z)`` (the weight's gradient) and ``sum dy`` (the bias's), and the
    scalars ``sum g * x`` (alpha's) and ``sum g`` (the shift's), where ``g = dy * w * f'(z)``."""
    dims = _shape(v, layout)
    _shape(dy, layout), _shape(out, layout)
    c = dims[1] if layout == "cf" else dims[-1]
    sums = torch.empty(2 * c + 2, dtype=torch.float64)
    w = _vector(weight, v.dtype)
    fn = getattr(_lib(), f"nl_squash_bwd_{layout}_{_SUFFIX[v.dtype]}")
    _check(fn(_ptr(dy), _ptr(v), _ptr(out), *dims, KINDS[kind], float(alpha), float(shift), _nullable(w),
              _ptr(sums), ctypes.c_void_p(sums.data_ptr() + 8 * c), ctypes.c_void_p(sums.data_ptr() + 16 * c),
              torch.get_num_threads()), f"squash_bwd_{layout}")
    return sums[:c], sums[c:2 * c], sums[2 * c].item(), sums[2 * c + 1].item()


def math_function(name: str, x: Tensor) -> Tensor:
    """``name`` ("exp", "tanh", "erf", "sigmoid"; "exp_act": the activation epilogues' exp;
    "gelu", "gelu_grad": the epilogues' exact GELU and its derivative; "gelu_half",
    "gelu_grad_half", "tanh_half", "erf_half": the half types' GELU, its derivative, tanh and
    erf, unrounded on float32 input; on half-precision input "tanh" and "erf" are these) of every
    value of ``x`` by the kernels' own functions (mathfn.h for the float types, libm for
    float64), for tests."""
    x = x.contiguous()
    y = torch.empty_like(x)
    getattr(_lib(), f"nl_mathfn_{_SUFFIX[x.dtype]}")(_ptr(x), _ptr(y), x.numel(), MATH_FUNCTIONS[name])
    return y
