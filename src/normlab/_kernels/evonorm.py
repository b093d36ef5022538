"""Bindings of EvoNorm's element-map kernels (``evonorm_impl.h``) on a (N, C, L) ("cf") or
(N, L, C) ("cl") view, with per-channel ``v`` and per-(n, c) coefficients. S0, with ``f(x) = x
sigmoid(v_c x)``:

==============  ==================================================================  ===
evos0_forward   ``y = f(x) * scale + shift``                                          2T
evos0_reduce    per (n, c): ``sum dy f(x)``, ``sum dy x^2 s (1 - s)``, ``sum dy``     2T
evos0_dx        ``dx = a * dy * f'(x) + b * (x - m)``                                 3T
==============  ==================================================================  ===

(``s = sigmoid(v_c x)``, ``f' = s + v_c x s (1 - s)``). B0, with ``u = 1 / max(D, v_c x + E)``
(``D`` the batch or running std, ``E`` the instance std; the left branch where ``D >= v_c x + E``):

==============  ==================================================================  ===
evob0_forward   ``y = x u * scale + shift``                                           2T
evob0_reduce    per (n, c): ``sum dy x u``, ``sum dy``, ``sum_left dy x u^2``,        2T
                ``sum_right dy x u^2``, ``sum_right dy x^2 u^2``
evob0_dx        ``dx = a dy (left: u, right: E u^2) + b (x - m) + k``                 3T
==============  ==================================================================  ===

Half-precision tensors are read and
written in their type and computed in float32. The engine's description
(:class:`normlab.engine.EvoS0Stats`, ``EvoB0Stats``) holds the math that uses them.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import _SUFFIX, _check, _dims, _lib, _nc, _nc_shape, _ptr

__all__ = ["evob0_dx", "evob0_forward", "evob0_reduce", "evos0_dx", "evos0_forward", "evos0_reduce"]

_declared: set = set()


def _fn(name: str, layout: str, dtype: torch.dtype, heads: int, tails: int):
    """The entry point ``nl_{name}_{layout}_{type}``: ``heads`` tensors, the three sizes, ``tails``
    arrays, the thread count (declared on first use: the library's loader does not know these)."""
    full = f"nl_{name}_{layout}_{_SUFFIX[dtype]}"
    fn = getattr(_lib(), full)
    if full not in _declared:
        p, i = ctypes.c_void_p, ctypes.c_int64
        fn.argtypes, fn.restype = [*[p] * heads, i, i, i, *[p] * tails, ctypes.c_int], ctypes.c_int
        _declared.add(full)
    return fn


def _vec(v: Tensor) -> Tensor:
    return v.detach().to(torch.float64).reshape(-1).contiguous()


def evos0_forward(x: Tensor, out: Tensor, layout: str, v: Tensor, scale: Tensor, shift: Tensor) -> None:
    """``out = x sigmoid(v x) * scale + shift`` (``v`` per channel; ``scale``, ``shift`` per (n, c))."""
    n, c = _nc_shape(x, layout)
    _dims(out)
    args = [_vec(v), _nc(scale, n, c), _nc(shift, n, c)]
    _check(_fn("evos0_fwd", layout, x.dtype, 2, 3)(_ptr(x), _ptr(out), *_dims(x), *map(_ptr, args), torch.get_num_threads()),
           "evos0_fwd")


def evos0_reduce(dy: Tensor, x: Tensor, layout: str, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per (n, c), float64 (N, C): ``sum dy f(x)``, ``sum dy x^2 s (1 - s)`` and ``sum dy``."""
    n, c = _nc_shape(x, layout)
    _dims(dy)
    sums = torch.empty(3, n, c, dtype=torch.float64)
    vv = _vec(v)
    _check(_fn("evos0_red", layout, x.dtype, 2, 4)(_ptr(dy), _ptr(x), *_dims(x), _ptr(vv), *(_ptr(t) for t in sums.unbind(0)),
                                       torch.get_num_threads()), "evos0_red")
    return sums[0], sums[1], sums[2]


def evos0_dx(dy: Tensor, x: Tensor, out: Tensor, layout: str, v: Tensor, a: Tensor, b: Tensor, m: Tensor) -> None:
    """``out = a * dy * f'(x) + b * (x - m)`` with per-(n, c) ``a``, ``b``, ``m``."""
    n, c = _nc_shape(x, layout)
    _dims(dy), _dims(out)
    args = [_vec(v), _nc(a, n, c), _nc(b, n, c), _nc(m, n, c)]
    _check(_fn("evos0_dx", layout, x.dtype, 3, 4)(_ptr(dy), _ptr(x), _ptr(out), *_dims(x), *map(_ptr, args),
                                      torch.get_num_threads()), "evos0_dx")


def evob0_forward(x: Tensor, out: Tensor, layout: str, v: Tensor, dstd: Tensor, istd: Tensor, scale: Tensor,
                  shift: Tensor) -> None:
    """``out = x / max(dstd, v x + istd) * scale + shift``."""
    n, c = _nc_shape(x, layout)
    _dims(out)
    args = [_vec(v), *(_nc(t, n, c) for t in (dstd, istd, scale, shift))]
    _check(_fn("evob0_fwd", layout, x.dtype, 2, 5)(_ptr(x), _ptr(out), *_dims(x), *map(_ptr, args),
                                                    torch.get_num_threads()), "evob0_fwd")


def evob0_reduce(dy: Tensor, x: Tensor, layout: str, v: Tensor, dstd: Tensor, istd: Tensor) -> Tensor:
    """The five per-(n, c) sums (float64 (5, N, C)): ``sum dy x u``, ``sum dy``, ``sum_left dy x
    u^2``, ``sum_right dy x u^2``, ``sum_right dy x^2 u^2``."""
    n, c = _nc_shape(x, layout)
    _dims(dy)
    sums = torch.empty(5, n, c, dtype=torch.float64)
    args = [_vec(v), _nc(dstd, n, c), _nc(istd, n, c), sums]
    _check(_fn("evob0_red", layout, x.dtype, 2, 4)(_ptr(dy), _ptr(x), *_dims(x), *map(_ptr, args),
                                                    torch.get_num_threads()), "evob0_red")
    return sums


def evob0_dx(dy: Tensor, x: Tensor, out: Tensor, layout: str, v: Tensor, dstd: Tensor, istd: Tensor, a: Tensor,
             b: Tensor, m: Tensor, k: Tensor) -> None:
    """``out = a dy (left: u, right: istd u^2) + b (x - m) + k``."""
    n, c = _nc_shape(x, layout)
    _dims(dy), _dims(out)
    args = [_vec(v), *(_nc(t, n, c) for t in (dstd, istd, a, b, m, k))]
    _check(_fn("evob0_dx", layout, x.dtype, 3, 7)(_ptr(dy), _ptr(x), _ptr(out), *_dims(x), *map(_ptr, args),
                                                   torch.get_num_threads()), "evob0_dx")
