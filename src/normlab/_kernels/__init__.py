"""normlab's CPU kernels (``kernels.c``, ``kernels_impl.h``), compiled on first use and called through ctypes.

Every batch, per-sample and mixed norm is, per (sample n, channel c), an affine map of ``x``
whose coefficients come from per-(n, c) moments. On a tensor viewed as ``(N, C, L)``
("cf") or ``(N, L, C)`` ("cl", channels-last) the primitives are:

==============  ===============================================  =========
moments         per (n, c): mean and M2 = sum (x - mean)^2        1T read
affine          y = act((x - center) * scale + shift)            2T
reduce          per (n, c): sum dy' and sum dy' * (x - center)    2T
dx              dx = a * dy' + b * (x - center) + k               3T
==============  ===============================================  =========

``act`` is an optional activation epilogue (leaky ReLU/ReLU, SiLU, exact GELU, or the TLU
``max(y, t)`` with a per-(n, c) threshold ``t``), with ``dy' = dy * act'(y)`` recomputed from
``x`` in the backward passes (which, for the TLU, also sum ``dy - dy'``: the threshold's share).
That is 8T a training step, the memory limit (see ../shared/PERFORMANCE.md), in either
layout, where torch's own kernels for channels-last group and instance norm make many
more passes. Moments are two-pass inside cache-sized blocks (x is read from memory once),
merged exactly across blocks in double precision. Two fused pairs serve the per-sample norms
(group, instance, layer, RMS): :func:`group_forward` (moments, group statistics and output
per (sample, group) block, or per sample channels-last, while it is in cache) and
:func:`group_backward` (the closed-form input gradient the same way); and
:func:`rows_forward` / :func:`rows_backward` normalize the rows of an (M, C) matrix
(the transformer's LayerNorm and RMSNorm over the channel axis); :func:`batch_forward` /
:func:`batch_backward` run batch norm one channel at a time from cache. These fused passes are
bound in ``fused.py`` and exported here.

The shared library is built with the system C compiler (``$CC``, else ``cc``/``gcc``,
``-O3 -march=native -fopenmp -ffp-contract=fast``: some 18 s, four units in parallel) into a private cache directory
(``$NORMLAB_CACHE``, else ``~/.cache/normlab``, else a fresh private temporary directory)
keyed by the source, the compiler and the CPU, and reused by later processes once its
recorded hash and a self-test pass (``_build.py`` says what is checked). Where no compiler is found
or the build fails, :func:`available` is False (the reason is in :func:`status`) and the
fast paths fall back to torch's kernels; ``NORMLAB_KERNELS=0`` turns them off, and
:func:`enabled` does so in a ``with`` block (for tests and benchmarks).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from contextlib import contextmanager
from typing import Iterator, NamedTuple

import torch
from torch import Tensor

from . import _build

__all__ = ["EPILOGUES", "Epilogue", "available", "enabled", "f16c", "status", "streaming", "supports", "moments", "affine",
           "reduce", "dx", "batch_forward", "batch_backward",
           "group_forward", "group_backward", "rows_forward", "rows_backward", "threshold_of",
           "linear_scan", "scans"]

_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.bfloat16: "bf16", torch.float16: "f16"}
"""The element types the kernels read and write; the half types compute and accumulate in float32."""

_lock = threading.Lock()
_state: dict = {"lib": None, "tried": False, "reason": "not loaded yet", "note": "", "on": [True]}


def _declare(lib: ctypes.CDLL) -> None:
    p, i, n = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    for s in _SUFFIX.values():
        for layout in ("cf", "cl"):
            getattr(lib, f"nl_moments_{layout}_{s}").argtypes = [p, i, i, i, p, p, n]
            d = ctypes.c_double
            getattr(lib, f"nl_affine_{layout}_{s}").argtypes = [p, p, i, i, i, p, p, p, n, d, p, n, n]
            getattr(lib, f"nl_reduce_{layout}_{s}").argtypes = [p, p, i, i, i, p, p, p, p, p, n, d, p, p, p, n, n]
            getattr(lib, f"nl_dx_{layout}_{s}").argtypes = [p, p, p, i, i, i, p, p, p, p, p, p, n, d, p, n, n, n]
            for kind in ("affine", "reduce", "dx"):
                getattr(lib, f"nl_{kind}_{layout}_{s}").restype = ctypes.c_int
            getattr(lib, f"nl_moments_{layout}_{s}").restype = ctypes.c_int if layout == "cl" else None
    for s in ("f32", "f64"):
        getattr(lib, f"nl_scan_{s}").argtypes = [p, p, p, i, i, p, p]
    from .elementwise import declare as declare_elementwise; declare_elementwise(lib)  # noqa: E702 (imports this module)
    declare_fused(lib)


def _lib() -> ctypes.CDLL | None:
    if not _state["tried"]:
        with _lock:
            if not _state["tried"]:
                if os.environ.get("NORMLAB_KERNELS", "1") == "0":
                    _state["reason"] = "turned off by NORMLAB_KERNELS=0"
                else:
                    try:
                        _state["lib"], _state["note"] = _build.build(_declare)
                        _state["reason"] = "loaded"
                    except Exception as exc:  # any build or load failure: fall back to torch's kernels
                        _state["reason"] = f"unavailable: {exc}"
                _state["tried"] = True
    return _state["lib"]


@contextmanager
def streaming(min_bytes: int) -> Iterator[None]:
    """``with streaming(0): ...`` writes the float32/float64 output passes' outputs of at least
    ``min_bytes`` bytes with streaming (non-temporal) stores (-1: never); the default streams
    outputs larger than the last-level cache (kernels.c says why). Same values either way; for
    tests and benchmarks, not thread-safe."""
    lib = _lib()
    if lib is None:
        yield
        return
    knob = ctypes.c_int64.in_dll(lib, "nl_stream_min_bytes")
    before = knob.value
    knob.value = int(min_bytes)
    try:
        yield
    finally:
        knob.value = before


def f16c() -> bool:
    """Whether the loaded kernels convert float16 with the CPU's F16C instructions (eight values an
    instruction; otherwise by bit operations, about 25 a value, where torch's kernels are faster)."""
    lib = _lib()
    return lib is not None and ctypes.c_int.in_dll(lib, "nl_f16c").value == 1


@functools.lru_cache(maxsize=None)
def wide_vectors() -> bool:
    """Whether the kernels are built for AVX-512 (``-march=native`` on this CPU; read once from
    /proc/cpuinfo): 16 floats a vector, where AVX2 has 8, which some routing and pass choices
    depend on (``engine/routing.py``'s half-precision batch norm, EvoNorm-B0's kept slope)."""
    return _build.cpu_vectors().startswith("AVX-512")


def supports(dtype: torch.dtype) -> bool:
    """Whether the kernels are available and read and write ``dtype``."""
    return dtype in _SUFFIX and available()


def available() -> bool:
    """True if the compiled kernels are loaded and switched on (compiles them on first call).
    False while torch.compile traces: compiled graphs take the plain path, which it fuses."""
    if _compiling():
        return False
    return _state["on"][-1] and _lib() is not None


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def switched_on() -> bool:
    """Whether the kernels are switched on (see :func:`enabled`); says nothing of whether they built."""
    return _state["on"][-1]


def status() -> str:
    """One line: whether the kernels are in use, and why not."""
    lib = _lib()
    if lib is None:
        return f"normlab CPU kernels {_state['reason']}"
    note = f" ({_state['note']})" if _state["note"] else ""
    return "normlab CPU kernels loaded" + note + ("" if _state["on"][-1] else " (switched off in this block)")


@contextmanager
def enabled(on: bool) -> Iterator[None]:
    """``with enabled(False): ...`` runs the fast paths on torch's kernels instead (not thread-safe)."""
    _state["on"].append(on)
    try:
        yield
    finally:
        _state["on"].pop()


def _fn(kind: str, layout: str, dtype: torch.dtype):
    return getattr(_lib(), f"nl_{kind}_{layout}_{_SUFFIX[dtype]}")


def _ptr(t: Tensor) -> ctypes.c_void_p:
    return ctypes.c_void_p(t.data_ptr())


def _dims(v: Tensor) -> tuple[int, int, int]:
    if v.ndim != 3 or not v.is_contiguous():
        raise ValueError(f"normlab kernels expect a contiguous 3-d view, got shape {tuple(v.shape)}")
    return tuple(v.shape)  # type: ignore[return-value]


def _empty64(count: int, *shape: int) -> list[Tensor]:
    """``count`` new float64 arrays of ``shape`` (one allocation each: cheaper between the passes
    than splitting one by ``unbind``, a view a piece)."""
    return [torch.empty(shape, dtype=torch.float64) for _ in range(count)]


def _nc(t: Tensor, n: int, c: int) -> Tensor:
    """A per-(n, c) coefficient as a contiguous float64 (N, C) tensor (no copy if it is one)."""
    if t.dtype == torch.float64 and t.shape == (n, c) and t.is_contiguous():
        return t.detach()
    return t.detach().to(torch.float64).expand(n, c).contiguous()


def _coefs(ts: list, n: int, c: int) -> tuple[list, list, int]:
    """Per-(n, c) coefficients (each broadcastable to (N, C); None where absent) as the kernels
    take them: a pointer each (None where absent) and the mask of those that are one float64 row
    of C values for every sample (bit j: ``ts[j]``; the kernels repeat it: the batch norms'
    per-channel coefficients cost no copy here). A float64 (N, C) array or row is passed as it
    is, anything else converted; the first list holds the conversions (keep it while the kernel
    reads them)."""
    held, ptrs, mask = [], [], 0
    for j, t in enumerate(ts):
        if t is None:
            ptrs.append(None)
            continue
        if t.dtype != torch.float64 and 1 <= t.ndim <= 2 and t.shape[-1] == c:
            # one conversion, not detach, convert, expand and copy: each small operation between
            # the passes costs 10-17 us there (see normlab.engine.describe)
            t = (t.detach() if t.requires_grad else t).to(torch.float64)
            held.append(t)
        if t.dtype == torch.float64 and 1 <= t.ndim <= 2 and t.shape[-1] == c and t.stride(-1) == 1:
            if t.ndim == 1 or t.shape[0] == 1 or t.stride(0) == 0:
                mask |= 1 << j
                ptrs.append(_ptr(t))
                continue
            if t.shape[0] == n and t.stride(0) == c:
                ptrs.append(_ptr(t))
                continue
        t = t.detach().to(torch.float64).expand(n, c).contiguous()
        held.append(t)
        ptrs.append(_ptr(t))
    return held, ptrs, mask


def _check(rc: int | None, kind: str) -> None:
    if rc:
        raise MemoryError(f"normlab kernel {kind}: could not allocate its work arrays")


def _nc_shape(v: Tensor, layout: str) -> tuple[int, int]:
    return (v.shape[0], v.shape[1]) if layout == "cf" else (v.shape[0], v.shape[2])


def moments(v: Tensor, layout: str) -> tuple[Tensor, Tensor]:
    """Per-(n, c) mean and M2 (sum of squared deviations) of ``v``, float64 (N, C)."""
    n, c = _nc_shape(v, layout)
    mean = torch.empty(n, c, dtype=torch.float64)
    m2 = torch.empty(n, c, dtype=torch.float64)
    _check(_fn("moments", layout, v.dtype)(_ptr(v), *_dims(v), _ptr(mean), _ptr(m2), torch.get_num_threads()), "moments")
    return mean, m2


EPILOGUES = {"leaky_relu": 1, "silu": 2, "gelu": 3, "tlu": 4}
"""The epilogues the kernels apply to the normalized value ``v``: ``act=`` an :class:`Epilogue`
(ReLU is leaky ReLU with slope 0; GELU is the exact, erf form; the TLU is ``max(v, threshold)``)."""


class Epilogue(NamedTuple):
    """An activation epilogue of the kernels: its :data:`EPILOGUES` code, leaky ReLU's negative
    slope, and the TLU's threshold (per channel (C,) or per (n, c) (N, C); else None).
    (A plain ``(code, slope)`` tuple is taken too.)"""

    code: int
    slope: float = 0.0
    threshold: Tensor | None = None


def threshold_of(act: tuple | None) -> Tensor | None:
    """The epilogue's threshold tensor (the TLU's), or None."""
    return act[2] if act is not None and len(act) > 2 else None


def _code(act: tuple | None) -> tuple[int, float]:
    return (0, 0.0) if act is None else (int(act[0]), float(act[1]))


def _threshold(act: tuple | None) -> Tensor | None:
    """The epilogue's threshold tensor, or None; an error for the TLU without one."""
    t = threshold_of(act)
    if _code(act)[0] == EPILOGUES["tlu"] and t is None:
        raise ValueError("normlab kernels: the TLU epilogue needs a threshold tensor")
    return t


def _thr(act: tuple | None, n: int, c: int) -> Tensor | None:
    """The threshold as a per-(n, c) float64 array (the per-sample kernels'), or None."""
    t = _threshold(act)
    return None if t is None else _nc(t, n, c)


def _act_coefs(act: tuple | None, scale: Tensor | None, shift: Tensor | None) -> list:
    """The epilogue's per-(n, c) coefficients (for :func:`_coefs`): scale, shift and threshold
    (None where absent; the TLU needs its threshold)."""
    t = _threshold(act)
    if act is None:
        return [None, None, None]
    if scale is None or shift is None:
        raise ValueError("normlab kernels: an epilogue in a backward pass needs the forward's scale and shift")
    return [scale, shift, t]


def affine(v: Tensor, out: Tensor, layout: str, center: Tensor, scale: Tensor, shift: Tensor,
           act: tuple | None = None) -> None:
    """``out = act((v - center) * scale + shift)`` with per-(n, c) coefficients (``out`` may be
    ``v``); ``act``: None, or an :class:`Epilogue`."""
    n, c = _nc_shape(v, layout)
    _dims(out)
    _held, ptrs, rows = _coefs([center, scale, shift, _threshold(act)], n, c)
    _check(_fn("affine", layout, v.dtype)(_ptr(v), _ptr(out), *_dims(v), *ptrs[:3], *_code(act),
                                          ptrs[3], rows, torch.get_num_threads()), "affine")


def _ptrs(ts: list) -> list:
    return [None if t is None else _ptr(t) for t in ts]


def _sums(n: int, c: int, act: tuple | None) -> list:
    """The per-(n, c) float64 sums a backward pass fills: g, h, and the threshold's e (or None)."""
    return _empty64(2, n, c) + [torch.empty(n, c, dtype=torch.float64) if threshold_of(act) is not None else None]


def _returned(g: Tensor, h: Tensor, e: Tensor | None) -> tuple[Tensor, ...]:
    return (g, h) if e is None else (g, h, e)


def reduce(dyv: Tensor, v: Tensor, layout: str, center: Tensor, act: tuple | None = None,
           scale: Tensor | None = None, shift: Tensor | None = None, keep: Tensor | None = None) -> tuple[Tensor, ...]:
    """Per-(n, c) ``sum(dy')`` and ``sum(dy' * (x - center))``, float64 (N, C), with ``dy' = dy``
    or, given the forward's ``act``, ``scale`` and ``shift``, ``dy * act'((x - center) * scale + shift)``;
    with a threshold (the TLU) also a third, ``sum(dy - dy')`` (the threshold's gradient).
    ``keep``: the input-gradient buffer of the :func:`dx` call to follow (``kept=True``), where
    the kernels keep ``dy'`` when that is cheaper than evaluating it again (SiLU, GELU)."""
    n, c = _nc_shape(v, layout)
    _dims(dyv)
    g, h, e = _sums(n, c, act)
    _held, (ctr, sc, sh, thr), rows = _coefs([center, *_act_coefs(act, scale, shift)], n, c)
    if keep is not None:
        _dims(keep)
    _check(_fn("reduce", layout, v.dtype)(_ptr(dyv), _ptr(v), *_dims(v), ctr, _ptr(g), _ptr(h), sc, sh,
                                          *_code(act), thr, *_ptrs([e, keep]), rows, torch.get_num_threads()),
           "reduce")
    return _returned(g, h, e)


def dx(dyv: Tensor, v: Tensor, out: Tensor, layout: str, center: Tensor, a: Tensor, b: Tensor, k: Tensor,
       act: tuple | None = None, scale: Tensor | None = None, shift: Tensor | None = None,
       kept: bool = False) -> None:
    """``out = a * dy' + b * (x - center) + k`` with per-(n, c) coefficients (``dy'`` as in
    :func:`reduce`; ``kept``: the reduce call was given ``keep=out``)."""
    n, c = _nc_shape(v, layout)
    _dims(dyv), _dims(out)
    _held, ptrs, rows = _coefs([center, a, b, k, *_act_coefs(act, scale, shift)], n, c)
    _check(_fn("dx", layout, v.dtype)(_ptr(dyv), _ptr(v), _ptr(out), *_dims(v), *ptrs[:6], *_code(act), ptrs[6],
                                      int(kept), rows, torch.get_num_threads()), "dx")


def _opt(t: Tensor | None) -> Tensor | None:
    """An optional per-channel array as the kernels read it: contiguous float64 (no operation
    where it is one already: each small one costs 5-30 us between the passes, see
    normlab.engine.describe; the kernels read the data, so no detach)."""
    if t is None or t.dtype == torch.float64 and t.is_contiguous():
        return t
    return t.to(torch.float64).contiguous()  # (a float64 view stays one after to(): contiguous() copies it)


def linear_scan(first: Tensor, coef: Tensor, inc: Tensor) -> tuple[Tensor, Tensor]:
    """``s_t = coef[t] * s_{t-1} + inc[t]`` over the rows t of (N, C) ``coef`` and ``inc`` from
    ``s_{-1} = first`` (C,): ``(before, last)`` with ``before[t] = s_{t-1}`` (N, C) and ``last =
    s_{N-1}`` (C,), in their dtype (float32 or float64, CPU; see :func:`scans`)."""
    n, c = inc.shape
    first, coef, inc = (t.contiguous() for t in (first, coef.expand(n, c), inc))
    before, last = torch.empty(n, c, dtype=inc.dtype), torch.empty(c, dtype=inc.dtype)
    getattr(_lib(), f"nl_scan_{_SUFFIX[inc.dtype]}")(*map(_ptr, (first, coef, inc)), n, c, _ptr(before), _ptr(last))
    return before, last


def scans(*ts: Tensor) -> bool:
    """Whether :func:`linear_scan` takes these tensors: the kernels on, CPU, one dtype, float32 or
    float64, nothing to differentiate (the scan is not an autograd op)."""
    d = ts[0].dtype
    return (d in (torch.float32, torch.float64) and available()
            and all(t.dtype == d and t.device.type == "cpu" and not t.requires_grad for t in ts))


# the fused passes (per sample or group, per channel, per row) live in fused.py, which imports the
# helpers above; their names are the package's, as before
from .fused import (  # noqa: E402
    batch_backward,
    batch_forward,
    group_backward,
    group_forward,
    rows_backward,
    rows_forward,
)
from .fused import declare as declare_fused  # noqa: E402
