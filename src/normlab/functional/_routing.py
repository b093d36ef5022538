"""Which path a fast entry point takes: the 3-d views of an input that the fused paths work
on, the size thresholds (measured), ``fast_path`` to force the fused path on or off, and
whether the compiled kernels run a given call."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _kernels

__all__ = ["HALF_DTYPES", "is_half", "route", "MIN_FAST_NUMEL", "MIN_FUSED_NUMEL", "MIN_KERNEL_GROUP_NUMEL", "MIN_KERNEL_NUMEL", "dy_view",
           "fast_layout", "fast_path", "forced", "kernel_views", "kernels_for"]

_FAST_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.bfloat16, torch.float16)
"""Half-precision inputs run on the compiled kernels (read and written in their own type,
computed in float32) at every size, or on the plain path where the kernels are missing:
torch's own CPU kernels in these types are several times slower than ours."""


def is_half(x: Tensor) -> bool:
    return x.dtype in HALF_DTYPES


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def _views(x: Tensor, cd: int) -> tuple[str, Tensor] | None:
    """("cf", (N, C, L) view) or ("cl", (N, L, C) view) of ``x`` without a copy, else None."""
    xm = x.movedim(cd, 1)
    n, c = xm.shape[0], xm.shape[1]
    length = xm.numel() // max(n * c, 1)
    if xm.is_contiguous():
        return "cf", xm.reshape(n, c, length)
    t = xm.movedim(1, -1)
    if t.is_contiguous():
        return "cl", t.reshape(n, length, c)
    return None


def kernel_views(x: Tensor, cd: int) -> tuple[str, Tensor] | None:
    """:func:`_views` for the compiled kernels: an input without positions ((N, C), one value
    per (n, c)) is taken as channels-last (N, 1, C), whose kernels vectorise over C, rather
    than as N * C rows of one value."""
    got = _views(x, cd)
    if got is not None and got[0] == "cf" and got[1].shape[2] == 1:
        v = got[1]
        return "cl", v.view(v.shape[0], 1, v.shape[1])
    return got


def dy_view(dy: Tensor, x: Tensor, cd: int, layout: str, kernel: bool = False) -> Tensor:
    """The incoming gradient as the same 3-d view as ``x`` (copied into ``x``'s layout if it
    arrives in another one, e.g. contiguous for a channels-last input); ``kernel``: the view
    of :func:`kernel_views`."""
    views = kernel_views if kernel else _views
    got = views(dy, cd)
    if got is None or got[0] != layout:
        got = views(torch.empty_like(x).copy_(dy), cd)
    return got[1]  # type: ignore[index]


# None: automatic (inputs of at least MIN_FAST_NUMEL values); True: always; False: never
_ENABLED: list[bool | None] = [None]

MIN_FAST_NUMEL = 1 << 15
"""Inputs with fewer values take the plain path where the fast path is torch's batch- or
group-norm kernels: those fork OpenMP threads for any size (a stall of tens of ms on a loaded
machine), while the plain path's reductions stay on one thread below this size (torch's
``GRAIN_SIZE``); measured, the fast path wins from about 10k values on."""

MIN_FUSED_NUMEL = 1 << 18
"""The same for :class:`AffineFromMoments` (switchable, batch-instance and RMS norm; the
channels-last layer, instance and group norms): its fixed cost (the statistics function's
small graph, about 0.3 ms) is repaid from about 150k-300k values on (measured, 2 threads)."""


MIN_KERNEL_NUMEL = 1 << 17
"""Batch norm and batch renorm use normlab's compiled kernels from this many values on, and
torch's batch-norm kernels below (where the kernels' fixed cost, about 0.1 ms of Python
around them, is not repaid; measured, 1 and 2 threads)."""

MIN_KERNEL_GROUP_NUMEL = 1 << 22
"""The same for channel-first group, layer and instance norm, whose alternative (torch's own
group-norm kernels, one pass per group from cache) is only beaten once the input no longer
fits in the last-level cache (measured: about even at 3M values, 10% faster at 6M)."""


def forced() -> bool:
    """True inside ``fast_path(True)`` (tests take the fast paths on small inputs too)."""
    return _ENABLED[0] is True


def kernels_for(x: Tensor, min_numel: int) -> bool:
    """Whether a fast path should run on the compiled kernels: available, and ``x`` has at
    least ``min_numel`` values (always under ``fast_path(True)``, so tests cover both; always
    for half precision, see :data:`HALF_DTYPES`)."""
    if x.dtype in HALF_DTYPES:
        return _kernels.supports(x.dtype)
    return _kernels.available() and (_ENABLED[0] is True or x.numel() >= min_numel)


class fast_path:
    """Context manager forcing the fused path on or off: ``with fast_path(False): ...`` runs
    the plain autograd reference, ``with fast_path(True): ...`` takes the fused path even for
    inputs below :data:`MIN_FAST_NUMEL`; for tests and benchmarks. Not thread-safe."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.prev = _ENABLED[0]
        _ENABLED[0] = self.enabled

    def __exit__(self, *exc: object) -> None:
        _ENABLED[0] = self.prev


def fast_layout(x: Tensor, cd: int, min_numel: int = MIN_FAST_NUMEL, half: bool = False) -> str | None:
    """The layout the fused path would use for ``x`` ("cf" or "cl"), or None if it does not apply.

    Inputs with fewer than ``min_numel`` values (:data:`MIN_FAST_NUMEL` or
    :data:`MIN_FUSED_NUMEL`) take the plain path unless ``fast_path(True)`` forces it.
    ``half``: the caller runs half-precision inputs on the compiled kernels (at any size).
    """
    mode = _ENABLED[0]
    if mode is False:
        return None
    if x.device.type != "cpu" or x.numel() == 0 or x.ndim < 2 or _compiling():
        return None
    if x.dtype in HALF_DTYPES:
        if not (half and _kernels.supports(x.dtype)):
            return None
    elif x.dtype not in _FAST_DTYPES or (mode is None and x.numel() < min_numel):
        return None
    v = _views(x, cd)
    return None if v is None else v[0]


# ---------------------------------------------------------------------------------------------
# The route of one call, decided once per input signature and cached.
#
# route       runs                                                      when (all must hold)
# "torch"     torch's own kernel for the same layer, in one call:      automatic mode, a CPU input
#             bn: torch.batch_norm; ln/gn/in: F.group_norm             (any float type) with fewer than
#                                                                      MIN_FAST_NUMEL values (bn: fewer
#                                                                      than MIN_KERNEL_NUMEL, or any size
#                                                                      without positions or channels-last,
#                                                                      where torch's kernel is faster),
#                                                                      parameters and buffers of its
#                                                                      dtype (or float32), local
#                                                                      statistics, a float momentum (bn),
#                                                                      more than one value per group,
#                                                                      no running statistics (in)
# "engine"    the fast entry point of ._fastpaths (which still falls   a CPU input not taking "torch",
#             back to "plain" where its views or sizes do not apply:   fast_path not False, not compiling
#             the compiled kernels, or torch's kernels beside them)
# "plain"     the plain autograd reference in the public function     fast_path(False), other devices
#                                                                      (CUDA, meta), torch.compile tracing
# ---------------------------------------------------------------------------------------------

_ROUTES: dict[tuple, str] = {}
_MAX_ROUTES = 4096
TORCH_ROUTES = ("bn", "ln", "gn", "in")


def _decide(norm: str, x: Tensor, cd: int, groups: int, dtypes: tuple, flags: tuple) -> str:
    mode = _ENABLED[0]
    if mode is False or x.device.type != "cpu" or _compiling():
        return "plain"
    half = x.dtype in HALF_DTYPES  # (torch's kernels take float32 parameters with half inputs)
    if (mode is None and norm in TORCH_ROUTES and (x.dtype in _FAST_DTYPES or half) and x.numel() > 0
            and all(d is None or d == x.dtype or (half and d == torch.float32) for d in dtypes) and all(flags)
            and x.numel() // (x.shape[0] * groups) > 1):
        if x.numel() < MIN_FAST_NUMEL:
            return "torch"
        if norm == "bn" and not half and (x.numel() < MIN_KERNEL_NUMEL or (kernel_views(x, cd) or ("cl",))[0] == "cl"):
            return "torch"  # (the engine would run torch's batch-norm kernels with more calls around them)
    return "engine"


def route(norm: str, x: Tensor, cd: int, groups: int = 1, dtypes: tuple = (), flags: tuple = ()) -> str:
    """"torch", "engine" or "plain" for a call of ``norm`` on ``x`` (see the table above).

    ``groups``: the statistics groups per sample (ln 1, gn G, in C; bn 1); ``dtypes``: those of
    the parameters and buffers (None where absent); ``flags``: the norm's own conditions for
    the "torch" route (all true to take it). The decision is cached per signature (shape,
    strides, dtype, device, channel axis, grad mode, ``fast_path`` and kernel settings), so a
    call pays one dictionary lookup."""
    key = (norm, x.shape, x.stride(), x.dtype, x.device, cd, groups, dtypes, flags, torch.is_grad_enabled(),
           _ENABLED[0], _kernels.switched_on(), _compiling())
    r = _ROUTES.get(key)
    if r is None:
        if len(_ROUTES) >= _MAX_ROUTES:
            _ROUTES.clear()
        r = _ROUTES[key] = _decide(norm, x, cd % x.ndim, groups, dtypes, flags)
    return r
