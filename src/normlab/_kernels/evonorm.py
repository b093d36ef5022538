"""Bindings of EvoNorm-S0's element-map kernels (``evonorm_impl.h``): with ``f(x) = x sigmoid(v_c x)``
and per-(n, c) coefficients on a (N, C, L) ("cf") or (N, L, C) ("cl") view,

==============  ==================================================================  ===
evos0_forward   ``y = f(x) * scale + shift``                                          2T
evos0_reduce    per (n, c): ``sum dy f(x)``, ``sum dy x^2 s (1 - s)``, ``sum dy``     2T
evos0_dx        ``dx = a * dy * f'(x) + b * (x - m)``                                 3T
==============  ==================================================================  ===

(``s = sigmoid(v_c x)``, ``f' = s + v_c x s (1 - s)``). Half-precision tensors are read and
written in their type and computed in float32. The engine's description
(:class:`normlab.engine.EvoS0Stats`) holds the math that uses them.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import _SUFFIX, _check, _dims, _lib, _nc, _nc_shape, _ptr

__all__ = ["evos0_dx", "evos0_forward", "evos0_reduce"]

_declared: set = set()


def _fn(kind: str, layout: str, dtype: torch.dtype):
    name = f"nl_evos0_{kind}_{layout}_{_SUFFIX[dtype]}"
    fn = getattr(_lib(), name)
    if name not in _declared:  # (declared on first use: the library's loader does not know these)
        p, i = ctypes.c_void_p, ctypes.c_int64
        heads = [p, p, p] if kind == "dx" else [p, p]  # (x, y), (dy, x) or (dy, x, dx)
        tail = [p, p, p] if kind == "fwd" else [p, p, p, p]  # v and the per-(n, c) arrays
        fn.argtypes, fn.restype = [*heads, i, i, i, *tail, ctypes.c_int], ctypes.c_int
        _declared.add(name)
    return fn


def _vec(v: Tensor) -> Tensor:
    return v.detach().to(torch.float64).reshape(-1).contiguous()


def evos0_forward(x: Tensor, out: Tensor, layout: str, v: Tensor, scale: Tensor, shift: Tensor) -> None:
    """``out = x sigmoid(v x) * scale + shift`` (``v`` per channel; ``scale``, ``shift`` per (n, c))."""
    n, c = _nc_shape(x, layout)
    _dims(out)
    args = [_vec(v), _nc(scale, n, c), _nc(shift, n, c)]
    _check(_fn("fwd", layout, x.dtype)(_ptr(x), _ptr(out), *_dims(x), *map(_ptr, args), torch.get_num_threads()),
           "evos0_fwd")


def evos0_reduce(dy: Tensor, x: Tensor, layout: str, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per (n, c), float64 (N, C): ``sum dy f(x)``, ``sum dy x^2 s (1 - s)`` and ``sum dy``."""
    n, c = _nc_shape(x, layout)
    _dims(dy)
    sums = torch.empty(3, n, c, dtype=torch.float64)
    vv = _vec(v)
    _check(_fn("red", layout, x.dtype)(_ptr(dy), _ptr(x), *_dims(x), _ptr(vv), *(_ptr(t) for t in sums.unbind(0)),
                                       torch.get_num_threads()), "evos0_red")
    return sums[0], sums[1], sums[2]


def evos0_dx(dy: Tensor, x: Tensor, out: Tensor, layout: str, v: Tensor, a: Tensor, b: Tensor, m: Tensor) -> None:
    """``out = a * dy * f'(x) + b * (x - m)`` with per-(n, c) ``a``, ``b``, ``m``."""
    n, c = _nc_shape(x, layout)
    _dims(dy), _dims(out)
    args = [_vec(v), _nc(a, n, c), _nc(b, n, c), _nc(m, n, c)]
    _check(_fn("dx", layout, x.dtype)(_ptr(dy), _ptr(x), _ptr(out), *_dims(x), *map(_ptr, args),
                                      torch.get_num_threads()), "evos0_dx")
