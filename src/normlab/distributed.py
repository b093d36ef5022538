"""Synchronized batch statistics: exact, differentiable all-reduce of partial moments.

Each process summarizes its local batch as per-channel ``(count, mean, M2)``. One
``all_gather`` ships all three; every process merges them with Chan's formula in rank
order, so all ranks hold bit-identical moments of the global batch. Ranks may hold
different batch sizes, including zero (a zero-count rank contributes nothing but still
takes part in the collectives).

The backward pass is one ``all_reduce`` of the gradients of the global (mean, M2), 2 values
per statistic whatever the number of processes (as torch's SyncBatchNorm reduces its
``sum_dy`` and ``sum_dy_xmu``). With

    mean = sum_r n_r mean_r / n,      M2 = sum_r M2_r + sum_r n_r (mean_r - mean)^2

and G_mean, G_M2 the gradients of every rank's loss summed over ranks,

    dL/dmean_r = (n_r / n) G_mean + 2 n_r (mean_r - mean) G_M2,      dL/dM2_r = G_M2

(the term through ``mean`` in M2 vanishes since sum_r n_r (mean_r - mean) = 0), so input
and parameter gradients equal those of one process holding the whole batch (after DDP's
averaging of parameter gradients, for a loss that is the global-batch mean).

Before the moments, every rank sends a small header (the number of statistics, their dtype,
the training flag, how many synchronized calls this process has begun on the group, and its
sample count): ranks that disagree (a different model, dtype or mode, or one that skipped a
step, e.g. after catching its own error) all raise the same :class:`SyncMismatchError`
instead of one aborting inside the backend and another pairing unrelated statistics; and a
step where every rank is empty returns a count of 0, so the running statistics stay as they
were, as for an unsynchronized empty batch. A rank that dies leaves the others waiting in a
collective until the process group's ``timeout`` (``init_process_group(timeout=...)``).

A layer's ``process_group`` is ``None`` (local statistics), a ``ProcessGroup``, or
:data:`WORLD` (torch's default group, looked up at call time, so a model can be converted
before ``init_process_group``). The functions here also take ``None`` for the default group.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from ._moments import Moments, reduce_moments

__all__ = ["WORLD", "SyncMismatchError", "all_reduce_moment_grads", "all_reduce_moments", "begin_call", "is_active",
           "resolve_group"]

WORLD = "world"
"""``process_group`` value meaning torch's default group (what ``convert_sync(model)`` sets)."""


def resolve_group(process_group: Any = None) -> Any:
    """The ``ProcessGroup`` object for ``process_group`` (``None`` or :data:`WORLD`: the default group)."""
    if process_group is None or (isinstance(process_group, str) and process_group == WORLD):
        return dist.group.WORLD
    if isinstance(process_group, str):
        raise ValueError(f"process_group must be None, {WORLD!r} or a torch.distributed ProcessGroup, "
                         f"got {process_group!r}")
    return process_group


def is_active(process_group: Any = None) -> bool:
    """True if torch.distributed is initialized and the group has more than one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return False
    group = resolve_group(process_group)
    if group is None or group == dist.GroupMember.NON_GROUP_MEMBER:
        return False
    return dist.get_world_size(group) > 1


class SyncMismatchError(RuntimeError):
    """The processes of a group disagree on a synchronized call (raised on every one of them)."""


_MAGIC = 0x6E6C7379  # "nlsy": the header of a synchronized-statistics call
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_calls: dict[Any, list] = {}  # group -> [synchronized calls begun, whether the last one is still to exchange]


def begin_call(process_group: Any = None) -> None:
    """Count a synchronized call on ``process_group`` before anything in it can fail (layers
    call this first, then validate their input), so that a process which raised and carried
    on is caught at its next exchange rather than paired with another step's statistics."""
    entry = _calls.setdefault(resolve_group(process_group), [0, False])
    entry[0] += 1
    entry[1] = True


def _call_number(group: Any) -> int:
    entry = _calls.setdefault(group, [0, False])
    if entry[1]:
        entry[1] = False  # the call begun by begin_call
    else:
        entry[0] += 1  # a direct functional call: it begins here
    return entry[0]


def _describe(row: list[int]) -> str:
    dtype = _DTYPES[row[2]] if 0 <= row[2] < len(_DTYPES) else "an unknown dtype"
    mode = "training" if row[3] else "eval"
    return f"{row[1]} statistics (channels) in {dtype}, {mode}, synchronized call {row[4]}"


def _exchange_header(mean: Tensor, count: Any, training: bool, group: Any) -> int:
    """All-gather every rank's header; raise :class:`SyncMismatchError` on every rank if they
    differ. Returns the sum of the ranks' sample counts (0: every rank was empty)."""
    # a rank's sample count (the largest slot's, for per-slot counts: only "all empty" is read from it)
    if isinstance(count, Tensor):
        local_count = int(count.max()) if count.numel() else 0
    else:
        local_count = int(count)
    dtype_code = _DTYPES.index(mean.dtype) if mean.dtype in _DTYPES else -1
    header = torch.tensor([_MAGIC, mean.numel(), dtype_code, int(training), _call_number(group), local_count],
                          dtype=torch.int64, device=mean.device)
    gathered = [torch.empty_like(header) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, header, group=group)
    rows = torch.stack(gathered).tolist()
    if any(row[:5] != rows[0][:5] for row in rows):
        ranks = "; ".join(f"rank {r}: " + (_describe(row) if row[0] == _MAGIC else "not a normlab header")
                          for r, row in enumerate(rows))
        raise SyncMismatchError(
            f"normlab synchronized statistics: the processes of the group disagree ({ranks}). Every process must "
            f"run the same model (channel counts, dtype) in the same mode through the same steps; a process that "
            f"skipped a synchronized call (e.g. after catching an error) cannot rejoin the others")
    return sum(row[5] for row in rows)


class _SyncMoments(torch.autograd.Function):
    """(local count, mean, M2) -> global (count, mean, M2): one all_gather forward, one all_reduce backward."""

    @staticmethod
    def forward(ctx, count: Tensor, mean: Tensor, m2: Tensor, group: Any):  # type: ignore[override]
        packed = torch.stack([count, mean, m2]).contiguous()  # one message per rank
        gathered = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, packed, group=group)
        counts, means, m2s = torch.stack(gathered).unbind(1)  # (world, *stat_shape) each
        total = reduce_moments(Moments(counts, means, m2s), 0)
        n, mean_g, m2_g = (t.squeeze(0) for t in total)
        ctx.group = group
        ctx.save_for_backward(count, mean, n, mean_g)
        ctx.mark_non_differentiable(n)
        return n, mean_g, m2_g

    @staticmethod
    @once_differentiable
    def backward(ctx, _g_n: Tensor, g_mean: Tensor, g_m2: Tensor):  # type: ignore[override]
        count, mean, n, mean_g = ctx.saved_tensors
        g = torch.stack([g_mean, g_m2]).contiguous()
        dist.all_reduce(g, group=ctx.group)  # the sum of every rank's gradients
        big_g_mean, big_g_m2 = g.unbind(0)
        grad_mean = big_g_mean * (count / n.clamp_min(1)) + big_g_m2 * (2 * count) * (mean - mean_g)
        return None, grad_mean, big_g_m2, None


def all_reduce_moments(local: Moments, process_group: Any = None, training: bool = True) -> Moments:
    """Merge every rank's ``Moments`` into those of the union: two all-gathers forward (the
    header, then the moments), one all-reduce backward.

    ``local`` may have any shape (per-channel, per-(sample, channel), ...); every rank must
    pass the same shape. ``count`` may be 0 (a rank with no samples). ``process_group``:
    ``None`` or :data:`WORLD` for torch's default group. With one process (or none
    initialized) the local moments are returned unchanged. The result's ``count`` is a tensor,
    or the plain number 0 when every rank was empty (nothing to fold into running statistics).
    Ranks that disagree on the statistics' size or dtype, on ``training``, or on how many
    synchronized calls they have made all raise :class:`SyncMismatchError`.
    """
    if not is_active(process_group):
        return local
    group = resolve_group(process_group)
    mean, m2 = local.mean, local.m2
    total = _exchange_header(mean, local.count, training, group)
    count = local.count if isinstance(local.count, Tensor) else torch.tensor(float(local.count), device=mean.device)
    count = count.to(device=mean.device, dtype=mean.dtype).expand_as(mean)
    n, mean_g, m2_g = _SyncMoments.apply(count, mean, m2, group)
    return Moments(0 if total == 0 else n, mean_g, m2_g)


def all_reduce_moment_grads(g_mean: Tensor, g_m2: Tensor, process_group: Any, stat_shape: Any,
                            dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Sum every rank's gradients with respect to the global (mean, M2): the backward message of
    :func:`all_reduce_moments`, for fast paths that differentiate by hand (the compiled batch
    norm kernels). Sent exactly as the autograd path sends it (shape ``(2, *stat_shape)``, the
    accumulation dtype of ``dtype``), so ranks on either path interoperate; returned as float64
    vectors."""
    from ._moments import accumulation_dtype

    acc = accumulation_dtype(dtype)
    packed = torch.stack([g_mean.to(acc).reshape(stat_shape), g_m2.to(acc).reshape(stat_shape)]).contiguous()
    dist.all_reduce(packed, group=resolve_group(process_group))
    return packed[0].reshape(-1).double(), packed[1].reshape(-1).double()
