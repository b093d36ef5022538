"""What the benchmarks measure with, shared by the layer bench (:mod:`normlab.bench`) and the
model and small-input benches (:mod:`normlab.bench_models`): a timer, page faults, the
allocator setting, bytes saved for backward, the paired bootstrap interval, the spread that says
a machine was loaded, and the host facts every result records."""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch
from torch import Tensor


def saved_bytes(fn: Callable[[], Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``fn()``."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: Tensor) -> Tensor:
        try:
            st = t.untyped_storage()
            key = (st.data_ptr(), str(t.device))
            seen[key] = max(seen.get(key, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. wrapped numbers)
            seen[(id(t), "")] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(seen.values())


def time_ms(f: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    f()
    return (time.perf_counter() - t0) * 1e3


def minor_faults() -> int:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    except (ImportError, OSError):  # not on this platform
        return 0


def steady_malloc() -> bool:
    """Stop glibc from handing freed input-sized blocks back to the OS (``mallopt``: mmap
    threshold 1 GiB, trim threshold 2 GiB), so that a fresh output buffer is not one page
    fault per 4 kB. On the machines this was measured on a fault costs about 0.7 us, i.e.
    2-3 ms for a (32, 64, 56, 56) float32 tensor: more than the normalization itself. For
    the process that calls it; returns False where there is no glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        return bool(libc.mallopt(m_mmap_threshold, 1 << 30)) and bool(libc.mallopt(m_trim_threshold, (1 << 31) - 1))
    except (OSError, AttributeError):
        return False


def use_malloc(malloc: str) -> str:
    """Apply a bench's ``malloc`` setting ("default": the allocator as users run it; "steady":
    :func:`steady_malloc`) and return the allocator's description for the report."""
    if malloc not in ("default", "steady"):
        raise ValueError(f"bench: malloc must be 'default' or 'steady', got {malloc!r}")
    if malloc == "default":
        return "default"
    return "steady (glibc trim/mmap thresholds raised)" if steady_malloc() else "default (no glibc)"


def paired_ratio_interval(ours: list[float], theirs: list[float], level: float = 0.95,
                          resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """A bootstrap interval (percentile, fixed seed) of the median of the per-round ratios
    ``ours[r] / theirs[r]``: the two steps of a round ran back to back, so a slow moment of the
    machine slows both and drops out of their ratio. An interval that holds 1.0 means the run
    cannot tell the two apart."""
    ratios = [a / b for a, b in zip(ours, theirs)]
    if len(ratios) < 2:
        r = ratios[0] if ratios else float("nan")
        return r, r
    gen = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(ratios), (resamples, len(ratios)), generator=gen)
    medians = torch.tensor(ratios, dtype=torch.float64)[picks].median(dim=1).values
    tail = (1.0 - level) / 2
    return float(medians.quantile(tail)), float(medians.quantile(1.0 - tail))


def host() -> dict[str, Any]:
    """What every bench result records of the machine it ran on: torch's version, its threads
    and the vector extension the kernels are built for (an AVX2 host runs the arithmetic-bound
    half-precision passes at half the width of an AVX-512 one: compare runs on like CPUs)."""
    from ._kernels._build import cpu_vectors

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu_vectors()}


def host_line(result: dict[str, Any]) -> str:
    """The start of every bench header: torch, threads, CPU vectors."""
    return f"torch {result['torch']}, {result['threads']} threads, {result.get('cpu', '?')}"


def spread(times: list[float]) -> float:
    """(upper quartile - lower quartile) / median of a baseline's rounds: how loaded the machine was."""
    if len(times) < 4:
        return 0.0
    q = statistics.quantiles(times, n=4)
    return (q[2] - q[0]) / statistics.median(times)
