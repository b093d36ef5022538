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

S0 per sample from cache (``evos0_impl.h``), its statistics included:

==================  ===================================================================  ===
evos0_forward       per-(n, c) moments, the group's ``r``, ``y = f(x) gamma r + beta``       1T + cache
evos0_backward      three sums (``F``, ``g``, ``Q`` as above) keeping ``dy f'(x)`` in ``dx``,  2T + 1T
                    then ``dx = gamma r dy f'(x) - (r^3 A / K) (x - mu_g)`` from cache
==================  ===================================================================  ===

Per-channel ``v``, per-(n, c) coefficients (``D``, ``E`` None for s0). Half-precision tensors
are read and written in their type and computed in float32. The engine's descriptions
(:class:`normlab.engine.EvoS0Stats`, ``EvoB0Stats``) hold the math that uses them.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import _SUFFIX, _check, _coefs, _dims, _lib, _nc, _nc_shape, _opt, _ptr

__all__ = ["KINDS", "evonorm_dx", "evonorm_forward", "evonorm_reduce", "evos0_backward", "evos0_forward"]

KINDS = {"s0": 0, "b0": 1}
"""The element maps, by name, as the kernels number them."""


def _fn(name: str, layout: str, dtype: torch.dtype, heads: int, tails: int, family: str = "evonorm"):
    """The entry point ``nl_{family}_{name}_{layout}_{type}``: ``heads`` tensors, the three sizes,
    the kind (evonorm) or the group count (evos0, then eps for its forward), ``tails`` arrays,
    (evonorm) the mask of the coefficients given as rows (:func:`normlab._kernels._coefs`), the
    thread count (declared on first use: the library's loader does not know these)."""
    fn = getattr(_lib(), f"nl_{family}_{name}_{layout}_{_SUFFIX[dtype]}")
    if fn.argtypes is None:  # (per loaded library: ctypes keeps one function object per name)
        p, i, n = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        mid = [n] if family == "evonorm" else [i, ctypes.c_double] if name == "fwd" else [i]
        rows = [n] if family == "evonorm" else []
        fn.argtypes, fn.restype = [*[p] * heads, i, i, i, *mid, *[p] * tails, *rows, n], ctypes.c_int
    return fn


def _vec(t: Tensor | None) -> Tensor | None:
    """A per-channel tensor as a contiguous float64 vector (None stays None)."""
    return None if t is None else _opt(t.reshape(-1))


def _arrays(v: Tensor, n: int, c: int, *per_nc: Tensor | None) -> tuple[list, list, int]:
    """``v`` as a float64 vector and the per-(n, c) coefficients as :func:`normlab._kernels._coefs`
    gives them (a row of zeros for None, S0's D and E): the tensors to hold while the kernel reads,
    the pointers (v's first) and the rows' mask."""
    zero = torch.zeros(c, dtype=torch.float64) if any(t is None for t in per_nc) else None
    vec = _vec(v)
    held, ptrs, rows = _coefs([zero if t is None else t for t in per_nc], n, c)
    return [vec, zero, *held], [_ptr(vec), *ptrs], rows


def evonorm_forward(kind: str, x: Tensor, out: Tensor, layout: str, v: Tensor, dstd: Tensor | None,
                    istd: Tensor | None, scale: Tensor, shift: Tensor) -> None:
    """``out = f(x) * scale + shift`` for the map ``kind`` ("s0", "b0")."""
    n, c = _nc_shape(x, layout)
    _dims(out)
    _held, ptrs, rows = _arrays(v, n, c, dstd, istd, scale, shift)
    _check(_fn("fwd", layout, x.dtype, 2, 5)(_ptr(x), _ptr(out), *_dims(x), KINDS[kind], *ptrs, rows,
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
    _held, ptrs, rows = _arrays(v, n, c, dstd, istd)
    _check(_fn("red", layout, x.dtype, 2, 5)(_ptr(dy), _ptr(x), *_dims(x), KINDS[kind], *ptrs, _ptr(sums),
                                              None if keep is None else _ptr(keep), rows, torch.get_num_threads()),
           "evonorm_red")
    return sums


def evonorm_dx(kind: str, dy: Tensor, x: Tensor, out: Tensor, layout: str, v: Tensor, dstd: Tensor | None,
               istd: Tensor | None, a: Tensor, b: Tensor, m: Tensor, k: Tensor | None, kept: bool = False) -> None:
    """``out = a dy slope(x) + b (x - m) + k`` for the map ``kind`` (``kept``: ``dy slope(x)`` is
    already in ``out``, from :func:`evonorm_reduce` with ``keep=out``)."""
    n, c = _nc_shape(x, layout)
    _dims(dy), _dims(out)
    _held, ptrs, rows = _arrays(v, n, c, dstd, istd, a, b, m, k)
    _check(_fn("dx", layout, x.dtype, 3, 8)(_ptr(dy), _ptr(x), _ptr(out), *_dims(x), KINDS[kind], *ptrs,
                                             _ptr(out) if kept else None, rows, torch.get_num_threads()), "evonorm_dx")


def evos0_forward(x: Tensor, out: Tensor, layout: str, groups: int, eps: float, v: Tensor, weight: Tensor | None,
                  bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EvoNorm-S0's forward per sample from cache into ``out``; returns the per-(n, c) mean and
    M2 of each channel, the group centre and ``r`` (float64 (N, C), the last two repeated over
    each group's channels)."""
    n, c = _nc_shape(x, layout)
    _dims(out)
    stats = torch.empty(4, n, c, dtype=torch.float64)
    args = [_vec(v), _vec(weight), _vec(bias), *stats]
    _check(_fn("fwd", layout, x.dtype, 2, 7, "evos0")(_ptr(x), _ptr(out), *_dims(x), groups, float(eps),
                                                       *(None if t is None else _ptr(t) for t in args),
                                                       torch.get_num_threads()), "evos0_fwd")
    return stats[0], stats[1], stats[2], stats[3]


def evos0_backward(dy: Tensor, x: Tensor, out: Tensor, layout: str, groups: int, v: Tensor, weight: Tensor | None,
                   ctr: Tensor, rstd: Tensor) -> Tensor:
    """EvoNorm-S0's input gradient per sample from cache into ``out`` (``ctr``, ``rstd`` from
    :func:`evos0_forward`); returns the per-(n, c) sums ``F``, ``g``, ``Q``, float64 (3, N, C)."""
    n, c = _nc_shape(x, layout)
    _dims(dy), _dims(out)
    sums = torch.empty(3, n, c, dtype=torch.float64)
    args = [_vec(v), _vec(weight), _nc(ctr, n, c), _nc(rstd, n, c), sums]
    _check(_fn("bwd", layout, x.dtype, 3, 5, "evos0")(_ptr(dy), _ptr(x), _ptr(out), *_dims(x), groups,
                                                       *(None if t is None else _ptr(t) for t in args),
                                                       torch.get_num_threads()), "evos0_bwd")
    return sums
