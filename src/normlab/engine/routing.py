"""Which backend runs a statistics norm: decided here, once per input signature, and cached.

The backends are torch's own kernel for the same layer ("torch"), normlab's compiled kernels
through the engine ("kernels"), and the plain autograd reference in ``normlab.functional``
("plain"). The table below is the whole policy; :func:`route` applies it and caches the
answer, so a call pays one dictionary lookup. Also here: the 3-d views of an input that the
kernels work on, and :class:`fast_path` to force the engine on or off (tests, benchmarks).
"""

from __future__ import annotations


import torch
from torch import Tensor

from .. import _kernels

__all__ = ["HALF_DTYPES", "MIN_FAST_NUMEL", "MIN_HALF_BN_NUMEL", "MIN_HALF_IN_KERNEL_NUMEL", "MIN_HALF_LNC_NUMEL",
           "MIN_KERNEL_GROUP_NUMEL",
           "MIN_KERNEL_NUMEL", "MIN_KERNEL_POSITIONS", "MIN_KERNEL_ROWS_NUMEL", "MIN_PN_NUMEL",
           "dy_view", "fast_path", "half_bn_on_kernels", "instance_by_batch_norm", "is_half", "kernel_views", "route",
           "signature", "view_like", "views"]

FLOAT_DTYPES = (torch.float32, torch.float64)
HALF_DTYPES = (torch.bfloat16, torch.float16)
"""Half-precision inputs run on the compiled kernels (read and written in their own type,
computed in float32), except where torch's kernel of the same layer is as fast or faster (see
MIN_HALF_BN_NUMEL, half_bn_on_kernels, instance_by_batch_norm and the table below)."""

MIN_FAST_NUMEL = 1 << 15
"""Below this many values bn, ln, gn and in call torch's own kernel once: the call is the
cost there, and one call of torch's is the cheapest (measured, 1 and 2 threads)."""

MIN_KERNEL_ROWS_NUMEL = 1 << 15
"""Below this many values rmsc (RMS norm over the channel axis alone) calls torch's RMS-norm
kernel on the channel-last rows (with parameters of the input's dtype) for a forward without a
graph (eval, inference); with one, the engine's row passes at every size. Measured float32,
engine / torch, since the engine runs on the input as it is (no views around the Function):
forward+backward 0.64-0.94 from 256 to 32k values (0.21-0.26 from 262k on, where torch's
RMSNorm backward is a composite of several full-size passes), forward 0.86-1.19 below 32k values,
0.81-1.02 at 32k, one and two threads. (Before, with the views: forward 1.9-2.7x and
forward+backward 0.96-1.2 at 32k-65k values, one thread.)"""

MIN_HALF_LNC_NUMEL = 1 << 19
"""lnc (layer norm over the channel axis alone) runs the engine's row passes in bfloat16 (and
float16 with F16C) from this many values on, with backward; torch's layer-norm kernel below,
without backward, and in the other dtypes. Measured two threads, layer forward+backward, rows /
torch's LayerNorm: bfloat16 1.35 at (8, 64, 256), 1.22 at (4, 1024, 64), 0.89 at (32, 64, 256),
0.80-0.82 at (8, 128, 768), (32, 128, 768) and (8, 3136, 64) (torch's bfloat16 layer norm is
slower than its float32 one, and its weight's gradient 0.1 relative off at (8, 56, 56, 64));
float32 1.01-1.95 at the same sizes (torch's float32 kernel is fast and the engine's per-call
cost, some 110 us a forward+backward more than torch's, is not repaid); float16 where the kernels
convert it with F16C as bfloat16: 1.38 at (8, 64, 256), 1.12 at (4, 1024, 64), 0.94 at (32, 64,
256), 0.85 at (8, 128, 768), 0.91 at (32, 3136, 64) (without F16C, by bit operations, 1.10-1.45
on the kernels alone: torch's then)."""


def _fast_float16(dtype: torch.dtype) -> bool:
    """Whether ``dtype`` is float16 and the kernels convert it with the CPU's F16C instructions
    (their channel-first and row passes; otherwise, and channels-last, by bit operations)."""
    return dtype == torch.float16 and _kernels.f16c()


def _half_rows_on_kernels(dtype: torch.dtype) -> bool:
    """Whether lnc of ``dtype`` may take the row passes (from MIN_HALF_LNC_NUMEL): bfloat16, and
    float16 where the kernels convert it with F16C."""
    return dtype == torch.bfloat16 or _fast_float16(dtype)

MIN_KERNEL_NUMEL = 1 << 19
"""float32/float64 batch norm runs on normlab's kernels from this many values per thread on
(channel-first with positions); below, and channels-last or without positions at any size,
torch's batch-norm kernel is as fast. Per thread: the engine's fixed cost a call does not
shrink with more threads, torch's kernel does (measured, engine / torch forward+backward: one
thread 1.6 at 131k values, 0.65 at 524k, 0.53 at 1M; two threads 2.04 at 262k, 1.34 at 524k,
0.91 at 1M)."""

MIN_HALF_BN_NUMEL = 1 << 21
"""bfloat16 batch norm runs on the kernels from this many values per thread on, torch's kernel
below (the engine's fixed cost, some 0.5 ms a step of small float64 work and calls around the
kernels, is repaid from about 2M values a thread: measured one thread 2.9x at 131k, 1.2x at 1M,
0.90 at 2M, 0.77 at 6.4M; two threads 1.33 at 2M, 0.99 at 4M, 1.02 at 6.4M)."""

MIN_F16_BN_NUMEL = 1 << 20
"""float16 batch norm runs on the kernels (where they convert it with F16C: :func:`half_bn_on_kernels`)
from this many values per thread on, torch's kernel below. Measured two threads, forward+backward,
engine / torch (the layer's float32 parameters with float16 input, as under autocast): 2.3-2.5 at
400k values, 1.09 at 800k, 1.52-1.59 at 1.6M, 0.58 at 3.2M, 0.50 at 6.4M."""

MIN_F16_GROUP_NUMEL = 1 << 18
"""float16 channel-first group, layer and instance norm run on the kernels (where they convert it
with F16C) from this many values on, torch's group-norm kernel below. Measured two threads,
forward+backward, engine / torch: 1.6-1.9 at 65k values, 1.2-1.4 at 131k, 0.96-1.02 at 262k,
0.55-1.10 at 401k, 0.31-0.41 at 6.4M (torch's float16 group norm, 7-8 ms there, is 2x its
bfloat16 one)."""


def half_bn_on_kernels(dtype: torch.dtype, layout: str = "cf") -> bool:
    """Whether half-precision batch norm in ``layout`` ("cf", "cl") may run on the kernels at all
    (from MIN_HALF_BN_NUMEL, MIN_F16_BN_NUMEL): bfloat16 on a CPU with AVX-512 only (on AVX2 the kernels' bfloat16 passes
    work 8 floats at a time and torch's kernel is as fast: measured, Zen 3, (32, 64, 56, 56),
    engine / torch forward+backward, six runs: 0.98-1.17, median 1.05); float16 channel-first
    where the kernels convert it with F16C (with bit operations the engine took 1.98-2.50x
    torch's). Channels-last float16 stays on torch's kernel, also with F16C: engine / torch 1.04
    at (32, 64, 56, 56), 1.19-1.35 at (32, 64, 28, 28) and (32, 256, 14, 14), 1.72 at (8, 64,
    28, 28)."""
    if dtype == torch.float16:
        return _fast_float16(dtype) and layout == "cf"
    return dtype == torch.bfloat16 and _kernels.wide_vectors()


def _min_bn_numel(dtype: torch.dtype) -> int:
    """Values per thread from which batch norm runs on the kernels (past the other rules)."""
    return MIN_F16_BN_NUMEL if dtype == torch.float16 else MIN_HALF_BN_NUMEL if dtype in HALF_DTYPES \
        else MIN_KERNEL_NUMEL


def _group_on_torch(x: Tensor, groups: int) -> bool:
    """Whether channel-first group, layer or instance norm of ``x`` (with a backward) stays on
    torch's group-norm kernel: bfloat16 always, float16 below MIN_F16_GROUP_NUMEL or without F16C
    (torch's half-precision group norm was as fast or faster there), float32/64 below
    MIN_KERNEL_GROUP_NUMEL, and with fewer than two (sample, group) items a thread."""
    if x.dtype == torch.float16:
        small = not _fast_float16(x.dtype) or x.numel() < MIN_F16_GROUP_NUMEL
    else:
        small = x.dtype == torch.bfloat16 or x.numel() < MIN_KERNEL_GROUP_NUMEL
    return small or x.shape[0] * groups < 2 * torch.get_num_threads()


MIN_HALF_IN_KERNEL_NUMEL = 1 << 17
"""From this many values a float16 instance norm on the "torch" route calls torch's instance-norm
kernel (a batch norm over the (1, N C, ...) view, as torch's InstanceNorm2d does) rather than its
group-norm kernel, whose float16 backward is slow (measured, two threads, forward+backward,
instance / group kernel: 1.95 at (8, 16, 8, 8), 0.78 at (32, 64, 14, 14), 0.50 at (32, 64, 28, 28),
0.35-0.73 at (32, 64, 56, 56); bfloat16 and float32 1.09-2.05: the group kernel there)."""


def instance_by_batch_norm(x: Tensor) -> bool:
    """Whether a norm with a group per channel (instance norm) of ``x`` on the "torch" route runs
    torch's instance-norm kernel (see MIN_HALF_IN_KERNEL_NUMEL) instead of its group-norm one."""
    return x.dtype == torch.float16 and x.numel() >= MIN_HALF_IN_KERNEL_NUMEL


MIN_KERNEL_GROUP_NUMEL = 1 << 22
"""float32/float64 channel-first group, layer and instance norm: torch's group-norm kernels (one
pass per group from cache) are only beaten once the input no longer fits in the last-level
cache (measured: about even at 3M values, 10% faster at 6M)."""

MIN_PN_NUMEL = 1 << 17
"""PowerNorm (which also needs MIN_KERNEL_POSITIONS positions: without, its per-(n, c) moments
are as large as the input) runs on the kernels from this many values on, its plain path below
(measured, engine / plain forward+backward, one thread: 1.6 at 8k values, 0.92 at 65k, 0.9 at
131k, 0.81 at 262k, 0.45 at 524k; 4.7 on (2048, 64) without positions)."""

MIN_KERNEL_POSITIONS = 16
"""The per-(sample, channel) norms (group, instance, layer, RMS, switchable, batch-instance) need
this many positions per (n, c) on the kernels: with fewer (an (N, C) input has one) their
per-(n, c) statistics are as large as the input, and plain autograd is faster (measured on
(256, 4096): sn 9 vs 64 ms, rms 1.8 vs 36 ms, ln 2.7 vs 3.8)."""


def is_half(x: Tensor) -> bool:
    return x.dtype in HALF_DTYPES


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def views(x: Tensor, cd: int) -> tuple[str, Tensor] | None:
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


_GEOMETRY: dict[tuple, tuple[str, tuple[int, ...], tuple[int, ...]] | None] = {}


def kernel_views(x: Tensor, cd: int) -> tuple[str, Tensor] | None:
    """:func:`views` for the kernels: an input without positions ((N, C), one value per (n, c))
    is taken as channels-last (N, 1, C), whose kernels vectorise over C. The view's layout,
    shape and strides are worked out once per (shape, strides, channel axis) and kept, so a
    call makes one ``as_strided``."""
    key = (x.shape, x.stride(), cd)
    geo = _GEOMETRY.get(key, False)
    if geo is False:
        got = views(x, cd)
        if got is not None and got[0] == "cf" and got[1].shape[2] == 1:
            v = got[1]
            got = "cl", v.view(v.shape[0], 1, v.shape[1])
        geo = None if got is None else (got[0], tuple(got[1].shape), got[1].stride())
        if len(_GEOMETRY) >= _MAX_ROUTES:
            _GEOMETRY.clear()
        _GEOMETRY[key] = geo
    if geo is None:
        return None
    return geo[0], x.as_strided(geo[1], geo[2], x.storage_offset())


def view_like(t: Tensor, layout: str, cd: int) -> Tensor | None:
    """``t``'s kernel view in ``layout`` (that of the input it goes with: an output, a gradient),
    or None where ``t`` is laid out otherwise."""
    got = kernel_views(t, cd)
    return got[1] if got is not None and got[0] == layout else None


def dy_view(dy: Tensor, x: Tensor, cd: int, layout: str) -> Tensor:
    """The incoming gradient as ``x``'s kernel view (copied into ``x``'s layout if it arrives
    in another one, e.g. contiguous for a channels-last input)."""
    got = view_like(dy, layout, cd)
    return got if got is not None else view_like(torch.empty_like(x).copy_(dy), layout, cd)  # type: ignore[return-value]


# None: automatic; True: the engine wherever it can run (tests); False: the plain reference
_ENABLED: list[bool | None] = [None]


class fast_path:
    """``with fast_path(False): ...`` runs the plain autograd reference; ``with fast_path(True):
    ...`` takes the engine wherever it can run, also where torch's kernel or the plain path
    would be chosen (for tests and benchmarks). Not thread-safe."""

    def __init__(self, enabled: bool | None) -> None:
        self.enabled = enabled

    def __enter__(self) -> None:
        self.prev = _ENABLED[0]
        _ENABLED[0] = self.enabled

    def __exit__(self, *exc: object) -> None:
        _ENABLED[0] = self.prev


# ---------------------------------------------------------------------------------------------
# The route of one call.
#
# route      runs                                            when
# "plain"    the plain autograd reference (the public        fast_path(False); a device other than
#            function's own math)                            the CPU (CUDA, meta); torch.compile
#                                                            tracing; a dtype other than float
#                                                            32/64, bfloat16, float16; an empty input
# "torch"    torch's own kernel for the same layer, one      norms torch has (bn, ln, gn, in without
#            call (bn: torch.batch_norm; ln, gn, in:         running statistics; ln/gn/in not on
#            F.group_norm, but in float16 from MIN_HALF_    channels-last input), local statistics,
#            IN_KERNEL_NUMEL torch.instance_norm), the       parameters of the input's dtype (or
#            same running-statistics rule                    float32 with half input), more than one
#                                                            value per group, not forced, and one of:
#                                                            fewer than MIN_FAST_NUMEL values (the
#                                                            only case with an activation); a call
#                                                            without backward (no grad mode, or an
#                                                            input that needs no gradient: eval and
#                                                            inference; measured forward alone, one
#                                                            thread, (32, 64, 56, 56): the engine
#                                                            1.2-1.5x torch's bn, ln, gn, in in
#                                                            float32, bn 1.35x in bfloat16); bn in
#                                                            float32/64 below MIN_KERNEL_NUMEL, or
#                                                            channels-last, or without positions; bn
#                                                            in bfloat16 below MIN_HALF_BN_NUMEL or
#                                                            without AVX-512, in float16 below
#                                                            MIN_F16_BN_NUMEL, without F16C or
#                                                            channels-last
#                                                            (half_bn_on_kernels); ln/gn/in channel-
#                                                            first in bfloat16, in float16 below
#                                                            MIN_F16_GROUP_NUMEL or without F16C, in
#                                                            float32/64 below MIN_KERNEL_GROUP_NUMEL,
#                                                            or with fewer than two (sample, group)
#                                                            items a thread (_group_on_torch); no
#                                                            compiled kernels (also when
#                                                            forced); rmsc (torch's RMS-norm kernel on
#                                                            the channel-last rows) below
#                                                            MIN_KERNEL_ROWS_NUMEL without a graph,
#                                                            parameters of the input's dtype, not
#                                                            forced; lnc (torch's
#                                                            layer-norm kernel) but in bfloat16 (and
#                                                            float16 with F16C) from
#                                                            MIN_HALF_LNC_NUMEL values with backward,
#                                                            not forced
# "kernels"  the engine (normlab.engine.function) on the     every other call the kernels can take:
#            compiled kernels: moments, the norm's           a channel-first or channels-last dense
#            description, one output pass; sums, the         view, at least MIN_KERNEL_POSITIONS
#            adjoint, one input-gradient pass (per-sample    positions per (n, c) for the per-sample
#            norms: both passes fused per (sample, group)    and mixed norms (any for bn); pn: also
#            from cache when there are enough items)         MIN_PN_NUMEL values
# "plain"    (again)                                         where neither applies
# ---------------------------------------------------------------------------------------------

_ROUTES: dict[tuple, str] = {}
_MAX_ROUTES = 4096
TORCH_NORMS = ("bn", "ln", "gn", "in")
PER_CHANNEL = ("bn", "mobn", "brn", "on", "squash")
"""Norms that need no positions on the kernels: per-channel statistics, online norm's stream,
and the element-wise ones (dyt, derf: ``normlab._kernels.elementwise``)."""
ROW_NORMS = ("lnc", "rmsc")
"""The norms over the channel axis alone, on the engine's row passes (no positions needed)."""


def _torch_fits(norm: str, x: Tensor, layout: str | None, groups: int, dtypes: tuple, flags: tuple) -> bool:
    """Whether torch's own kernel computes this call as the norm does. Not its group norm on
    channels-last input: that kernel computes E[x^2] - E[x]^2 (wrong in every digit at mean =
    1e4 x spread in float32, tests/test_fused.py), where the engine and the plain path are exact."""
    half = x.dtype in HALF_DTYPES  # (torch's kernels take float32 parameters with half inputs)
    return (norm in TORCH_NORMS and all(flags) and (norm == "bn" or layout != "cl")
            and all(d is None or d == x.dtype or (half and d == torch.float32) for d in dtypes)
            and x.numel() // (x.shape[0] * groups) > 1)


def _decide(norm: str, x: Tensor, cd: int, groups: int, dtypes: tuple, flags: tuple, act: bool) -> str:
    mode = _ENABLED[0]
    if (mode is False or x.device.type != "cpu" or _compiling() or x.numel() == 0
            or x.dtype not in FLOAT_DTYPES + HALF_DTYPES):
        return "plain"
    kv = kernel_views(x, cd)
    supported = kv is not None and _kernels.supports(x.dtype)
    if _torch_fits(norm, x, kv and kv[0], groups, dtypes, flags) and (mode is None or not supported):
        half = x.dtype in HALF_DTYPES
        if not supported or x.numel() < MIN_FAST_NUMEL:
            return "torch"
        if act:  # the activation in the engine's output pass saves two of torch's five passes
            return "kernels"
        if not (x.requires_grad and torch.is_grad_enabled()):
            return "torch"  # forward only (eval, inference): torch's one call is the faster there
        if norm == "bn" and (kv[0] == "cl" and not half or half and not half_bn_on_kernels(x.dtype, kv[0]) or  # type: ignore[index]
                             x.numel() < _min_bn_numel(x.dtype) * torch.get_num_threads()):
            return "torch"
        if norm != "bn" and kv[0] == "cf" and _group_on_torch(x, groups):  # type: ignore[index]
            return "torch"
    if (norm == "rmsc" and mode is None and x.numel() < MIN_KERNEL_ROWS_NUMEL
            and not (x.requires_grad and torch.is_grad_enabled()) and all(d is None or d == x.dtype for d in dtypes)):
        return "torch"
    if norm == "lnc" and mode is None and (not _half_rows_on_kernels(x.dtype) or x.numel() < MIN_HALF_LNC_NUMEL
                                           or not (x.requires_grad and torch.is_grad_enabled())):
        return "torch"
    kernels = supported
    if kernels and norm not in PER_CHANNEL and norm not in ROW_NORMS:
        kernels = x.numel() // (x.shape[0] * x.shape[cd]) >= MIN_KERNEL_POSITIONS or mode is True
    if kernels and norm == "pn":
        kernels = x.numel() >= MIN_PN_NUMEL or mode is True
    return "kernels" if kernels else "plain"


def signature(x: Tensor) -> tuple:
    """What a route depends on besides the norm's own arguments: the input's shape, strides, dtype,
    device and requires_grad, the grad mode, and the :class:`fast_path`, kernel and thread settings.
    (Layers key their cached calls on it too: ``normlab.layers.base.Norm``.)"""
    return (x.shape, x.stride(), x.dtype, x.device, x.requires_grad, torch.is_grad_enabled(), _ENABLED[0],
            _kernels.switched_on(), torch.get_num_threads())


def route(norm: str, x: Tensor, cd: int, groups: int = 1, dtypes: tuple = (), flags: tuple = (),
          act: bool = False) -> str:
    """"torch", "kernels" or "plain" for a call of ``norm`` on ``x`` (the table above).

    ``cd``: the channel axis (non-negative); ``groups``: the statistics groups per sample (ln
    1, gn G, in C; bn 1); ``dtypes``: those of the parameters and buffers (None where absent);
    ``flags``: the norm's own conditions for the "torch" route (all true to take it); ``act``: the
    engine would fuse the activation that follows (:func:`normlab.engine.fuses`; then the engine,
    from MIN_FAST_NUMEL values on; on the "torch" route the caller applies it after). Cached
    per norm, arguments and :func:`signature` (shape, strides, dtype, device, grad mode,
    ``fast_path``, kernel and thread settings)."""
    if _compiling():  # torch.compile traces the plain path (and fuses it)
        return "plain"
    key = (norm, cd, groups, dtypes, flags, act) + signature(x)
    r = _ROUTES.get(key)
    if r is None:
        if len(_ROUTES) >= _MAX_ROUTES:
            _ROUTES.clear()
        r = _ROUTES[key] = _decide(norm, x, cd, groups, dtypes, flags, act)
    return r
