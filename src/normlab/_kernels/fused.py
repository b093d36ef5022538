"""Bindings of the fused passes, each a norm's whole forward or backward over a work item
that stays in cache: per (sample, group) or per sample (:func:`group_forward`,
:func:`group_backward`: group, layer, instance and RMS norm), per channel (:func:`batch_forward`,
:func:`batch_backward`: batch norm on large channel-first inputs with long rows) and per row of
an (M, C) matrix (:func:`rows_forward`, :func:`rows_backward`: the transformer's layer and RMS
norm over the channel axis). The generic passes and the helpers are in the package's
``__init__``.
"""

from __future__ import annotations

import ctypes

import torch
from torch import Tensor

from . import _check, _code, _dims, _empty64, _fn, _lib, _nc, _nc_shape, _opt, _ptr, _ptrs, _returned, _SUFFIX, _sums, _thr

__all__ = ["declare", "group_forward", "group_backward", "batch_forward", "batch_backward", "rows_forward",
           "rows_backward"]


def declare(lib: ctypes.CDLL) -> None:
    """Set the argument types of the fused entry points (called when the library loads)."""
    p, i, n, d = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_double
    for s in _SUFFIX.values():
        fn = getattr(lib, f"nl_batch_fwd_cf_{s}")
        fn.argtypes, fn.restype = [p, p, i, i, i, d, n, p, p, n, d, p, p, n], ctypes.c_int
        fn = getattr(lib, f"nl_batch_bwd_cf_{s}")
        fn.argtypes, fn.restype = [p, p, p, i, i, i, p, p, n, p, p, n, d, p, p, n], ctypes.c_int
        for layout in ("cf", "cl"):
            fn = getattr(lib, f"nl_group_fwd_{layout}_{s}")
            fn.argtypes, fn.restype = [p, p, i, i, i, i, d, n, p, p, n, d, p, p, p, p, p, n], ctypes.c_int
            fn = getattr(lib, f"nl_group_bwd_{layout}_{s}")
            fn.argtypes, fn.restype = [p, p, p, i, i, i, i, n, p, p, n, d, p, p, p, p, p, p, n], ctypes.c_int
        fn = getattr(lib, f"nl_rows_fwd_{s}")
        fn.argtypes, fn.restype = [p, p, i, i, d, p, p, n, p, p, n], ctypes.c_int
        fn = getattr(lib, f"nl_rows_bwd_{s}")
        fn.argtypes, fn.restype = [p, p, p, i, i, p, n, p, p, p, p, n], ctypes.c_int


def group_forward(v: Tensor, out: Tensor, layout: str, num_groups: int, eps: float, center: bool,
                  weight: Tensor | None, bias: Tensor | None, act: tuple | None = None,
                  channel_moments: bool = True) -> tuple[Tensor | None, Tensor | None, Tensor, Tensor]:
    """A per-sample norm in one pass from cache: group norm (``num_groups`` groups of
    consecutive channels; 1 = layer norm, C = instance norm) or, with ``center=False``, RMS
    norm; ``out = act((x - center) * weight * rstd + bias)`` (``act`` as in :func:`affine`).
    Channels-last, one sample per work item (use it for N at least twice the thread count);
    channel-first, one (sample, group). Returns the per-(n, c) mean and M2 and, for the
    backward, the per-(n, c) group centre (0 for RMS) and 1/std, all float64 (N, C); with
    ``channel_moments=False`` None for the first two, and a group that is one contiguous block
    (channel-first always, channels-last with one group) has its moments taken as one row."""
    n, c = _nc_shape(v, layout)
    _dims(out)
    mean, m2, ctr, rstd = _empty64(4, n, c)
    if not channel_moments:
        mean = m2 = None
    w, b, thr = _opt(weight), _opt(bias), _thr(act, n, c)  # (held: the kernel reads them)
    _check(_fn("group_fwd", layout, v.dtype)(_ptr(v), _ptr(out), *_dims(v), num_groups, float(eps), int(center),
                                             *_ptrs([w, b]), *_code(act), *_ptrs([thr, mean, m2]), _ptr(ctr),
                                             _ptr(rstd), torch.get_num_threads()), "group_fwd")
    return mean, m2, ctr, rstd


def group_backward(dyv: Tensor, v: Tensor, out: Tensor, layout: str, num_groups: int, center: bool,
                   weight: Tensor | None, ctr: Tensor, rstd: Tensor, bias: Tensor | None = None,
                   act: tuple | None = None) -> tuple[Tensor, ...]:
    """The input gradient of :func:`group_forward`'s norm into ``out``, from cache (same work
    items), given the forward's per-(n, c) group centre and 1/std (and, with ``act``, its bias);
    returns the per-(n, c) ``sum dy'`` and ``sum dy' (x - centre)`` (for the weight and bias
    gradients; ``dy'`` is ``dy`` times the activation's derivative) and, with a threshold,
    ``sum (dy - dy')`` (as :func:`reduce`)."""
    n, c = _nc_shape(v, layout)
    _dims(dyv), _dims(out)
    g, h, e = _sums(n, c, act)
    w, b, thr = _opt(weight), _opt(bias), _thr(act, n, c)  # (held: the kernel reads them)
    ctr64, rstd64 = _nc(ctr, n, c), _nc(rstd, n, c)
    _check(_fn("group_bwd", layout, v.dtype)(_ptr(dyv), _ptr(v), _ptr(out), *_dims(v), num_groups, int(center),
                                             *_ptrs([w, b]), *_code(act), *_ptrs([thr]), _ptr(ctr64),
                                             _ptr(rstd64), _ptr(g), _ptr(h), *_ptrs([e]), torch.get_num_threads()),
           "group_bwd")
    return _returned(g, h, e)


def batch_forward(v: Tensor, out: Tensor, eps: float, mean_only: bool, weight: Tensor | None,
                  bias: Tensor | None, act: tuple | None = None) -> tuple[Tensor, Tensor]:
    """Batch norm (``mean_only``: without the division) of a channel-first ``(N, C, L)`` view
    into ``out``, one channel at a time from cache: the channel's moments, then its output
    ``act((x - mean) * weight * rstd + bias)`` (``act`` as in :func:`affine`, no threshold).
    Returns the per-channel mean and M2 (float64 (C,), over N L values)."""
    _, c, _ = _dims(v)
    _dims(out)
    mean, m2 = _empty64(2, c)
    w, b = _opt(weight), _opt(bias)  # (held: the kernel reads them)
    _check(_fn("batch_fwd", "cf", v.dtype)(_ptr(v), _ptr(out), *_dims(v), float(eps), int(mean_only), *_ptrs([w, b]),
                                           *_code(act), _ptr(mean), _ptr(m2), torch.get_num_threads()), "batch_fwd")
    return mean, m2


def batch_backward(dyv: Tensor, v: Tensor, out: Tensor, mean: Tensor, rstd: Tensor, mean_only: bool,
                   weight: Tensor | None, bias: Tensor | None = None, act: tuple | None = None) -> tuple[Tensor, Tensor]:
    """The input gradient of :func:`batch_forward`'s norm into ``out``, one channel at a time
    from cache, given the channel means and 1/std (float64 (C,)); returns the per-channel
    ``sum dy'`` and ``sum dy' (x - mean)`` as float64 (1, C) (the weight and bias gradients)."""
    _, c, _ = _dims(v)
    _dims(dyv), _dims(out)
    g, h = _empty64(2, 1, c)
    w, b = _opt(weight), _opt(bias)
    mean64, rstd64 = _opt(mean), _opt(rstd)  # ((1, C) or (C,): c values)
    _check(_fn("batch_bwd", "cf", v.dtype)(_ptr(dyv), _ptr(v), _ptr(out), *_dims(v), _ptr(mean64), _ptr(rstd64),
                                           int(mean_only), *_ptrs([w, b]), *_code(act), _ptr(g), _ptr(h),
                                           torch.get_num_threads()), "batch_bwd")
    return g, h


def _rows(t: Tensor) -> tuple[int, int]:
    """(M, C) of a contiguous tensor taken as M rows of its last axis' C values (any shape: a
    view to (M, C) would cost an operation a call)."""
    if t.ndim == 0 or not t.is_contiguous():
        raise ValueError(f"normlab kernels expect contiguous rows (channels last), got shape {tuple(t.shape)}"
                         f"{'' if t.ndim == 0 else f' with strides {t.stride()}'}")
    c = t.shape[-1]
    return t.numel() // max(c, 1), c


_COMPUTE = {torch.float64: torch.float64}  # the kernels' compute type F: float32 but for double


def _row_param(param: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A row kernel's weight or bias, in its compute type (no operation for a float32 layer's)."""
    want = _COMPUTE.get(dtype, torch.float32)
    if param is None or param.dtype == want and param.is_contiguous():
        return param
    return param.detach().to(want).contiguous()


def rows_forward(x: Tensor, out: Tensor, eps: float, weight: Tensor | None, bias: Tensor | None = None,
                 center: bool = False) -> tuple[Tensor | None, Tensor]:
    """Layer norm (``center``) or RMS norm of each row of a contiguous (M, C) matrix (or any
    contiguous tensor, as rows of its last axis) into ``out``; returns the rows' means (None for RMS) and 1/std, float64 (M,) each, for :func:`rows_backward`."""
    m, c = _rows(x)
    _rows(out)
    mean = torch.empty(m, dtype=torch.float64) if center else None
    rstd = torch.empty(m, dtype=torch.float64)
    w, b = _row_param(weight, x.dtype), _row_param(bias, x.dtype)
    _check(getattr(_lib(), f"nl_rows_fwd_{_SUFFIX[x.dtype]}")(
        _ptr(x), _ptr(out), m, c, float(eps), *_ptrs([w, b]), int(center), *_ptrs([mean]), _ptr(rstd),
        torch.get_num_threads()), "rows_fwd")
    return mean, rstd


def rows_backward(dy: Tensor, x: Tensor, out: Tensor, weight: Tensor | None, mean: Tensor | None, rstd: Tensor,
                  weight_grad: bool, bias_grad: bool = False) -> tuple[Tensor | None, Tensor | None]:
    """The input gradient of :func:`rows_forward` into ``out``; returns the weight's and the bias's,
    float64 (C,) each, where asked (else None)."""
    m, c = _rows(x)
    _rows(dy), _rows(out)
    w = _row_param(weight, x.dtype)
    dw = torch.empty(c, dtype=torch.float64) if weight_grad else None
    db = torch.empty(c, dtype=torch.float64) if bias_grad else None
    _check(getattr(_lib(), f"nl_rows_bwd_{_SUFFIX[x.dtype]}")(
        _ptr(dy), _ptr(x), _ptr(out), m, c, *_ptrs([w]), int(mean is not None), *_ptrs([mean]), _ptr(rstd),
        *_ptrs([dw, db]), torch.get_num_threads()), "rows_bwd")
    return dw, db
