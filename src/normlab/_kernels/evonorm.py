"""Bindings of EvoNorm's element-map kernels (``evonorm_impl.h``, which documents them) on a
(N, C, L) ("cf") or (N, L, C) ("cl") view: ``y = f(x) * scale + shift`` with the element map

- ``"s0"``: ``f(x) = x s``, ``s = sigmoid(v_c x)``; slope ``f'(x) = s + v_c x s (1 - s)``;
- ``"b0"``: ``f(x) = x u``, ``u = 1 / max(D, v_c x + E)`` (``D`` the batch or running std, ``E``
  the instance std); slope ``dy/dx``: ``u`` where ``D >= v_c x + E`` (left), ``E u^2`` elsewhere.

==================  ===================================================================  ===
evonorm_forward     ``y = f(x) * scale + shift``                                           2T
evonorm_reduce      five per-(n, c) sums: ``sum dy f(x)``, ``sum dy``; s0: ``sum dy x^2    2T
                    s (1 - s)``; b0: ``sum_left dy x u^2``, ``sum_right dy x u^2``,
                    ``sum_right dy x^2 u^2``
evonorm_dx          ``dx = a dy slope(x) + b (x - m) + k``                                 3T
==================  ===================================================================  ===

Per-channel ``v``, per-(n, c) coefficients (``D``, ``E`` None for s0). Half-precision tensors
are read and written in their type and computed in float32. The engine's descriptions
(:class:`normlab.engine.EvoS0Stats`, ``EvoB0Stats``) hold the math that uses them.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import _SUFFIX, _check, _dims, _lib, _nc, _nc_shape, _ptr

__all__ = ["KINDS", "evonorm_dx", "evonorm_forward", "evonorm_reduce"]

KINDS = {"s0": 0, "b0": 1}
"""The element maps, by name, as the kernels number them."""

_declared: set = set()


def _fn(name: str, layout: str, dtype: torch.dtype, heads: int, tails: int):
    """The entry point ``nl_evonorm_{name}_{layout}_{type}``: ``heads`` tensors, the three sizes,
    the kind, ``tails`` arrays, the thread count (declared on first use: the library's loader
    does not know these)."""
    full = f"nl_evonorm_{name}_{layout}_{_SUFFIX[dtype]}"
    fn = getattr(_lib(), full)
    if full not in _declared:
        p, i, n = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        fn.argtypes, fn.restype = [*[p] * heads, i, i, i, n, *[p] * tails, n], ctypes.c_int
        _declared.add(full)
    return fn


def _arrays(v: Tensor, n: int, c: int, *per_nc: Tensor | None) -> list[Tensor]:
    """``v`` as a float64 vector, then the per-(n, c) arrays as float64 (N, C) (zeros for None)."""
    zero = torch.zeros(1, 1, dtype=torch.float64)
    return [v.detach().to(torch.float64).reshape(-1).contiguous(),
            *(_nc(zero if t is None else t, n, c) for t in per_nc)]


def evonorm_forward(kind: str, x: Tensor, out: Tensor, layout: str, v: Tensor, dstd: Tensor | None,
                    istd: Tensor | None, scale: Tensor, shift: Tensor) -> None:
    """``out = f(x) * scale + shift`` for the map ``kind`` ("s0", "b0")."""
    n, c = _nc_shape(x, layout)
    _dims(out)
    args = _arrays(v, n, c, dstd, istd, scale, shift)
    _check(_fn("fwd", layout, x.dtype, 2, 5)(_ptr(x), _ptr(out), *_dims(x), KINDS[kind], *map(_ptr, args),
                                              torch.get_num_threads()), "evonorm_fwd")


def evonorm_reduce(kind: str, dy: Tensor, x: Tensor, layout: str, v: Tensor, dstd: Tensor | None,
                   istd: Tensor | None, keep: Tensor | None = None) -> Tensor:
    """The five per-(n, c) sums of the map ``kind``, float64 (5, N, C). ``keep``: the buffer of
    the :func:`evonorm_dx` call to follow (``kept=True``), where ``dy * slope(x)`` is stored."""
    n, c = _nc_shape(x, layout)
    _dims(dy)
    if keep is not None:
        _dims(keep)
    sums = torch.empty(5, n, c, dtype=torch.float64)
    args = [*_arrays(v, n, c, dstd, istd), sums]
    _check(_fn("red", layout, x.dtype, 2, 5)(_ptr(dy), _ptr(x), *_dims(x), KINDS[kind], *map(_ptr, args),
                                              None if keep is None else _ptr(keep), torch.get_num_threads()),
           "evonorm_red")
    return sums


def evonorm_dx(kind: str, dy: Tensor, x: Tensor, out: Tensor, layout: str, v: Tensor, dstd: Tensor | None,
               istd: Tensor | None, a: Tensor, b: Tensor, m: Tensor, k: Tensor | None, kept: bool = False) -> None:
    """``out = a dy slope(x) + b (x - m) + k`` for the map ``kind`` (``kept``: ``dy slope(x)`` is
    already in ``out``, from :func:`evonorm_reduce` with ``keep=out``)."""
    n, c = _nc_shape(x, layout)
    _dims(dy), _dims(out)
    args = _arrays(v, n, c, dstd, istd, a, b, m, k)
    _check(_fn("dx", layout, x.dtype, 3, 8)(_ptr(dy), _ptr(x), _ptr(out), *_dims(x), KINDS[kind], *map(_ptr, args),
                                             _ptr(out) if kept else None, torch.get_num_threads()), "evonorm_dx")
