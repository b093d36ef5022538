"""Building and loading the compiled kernels: the compiler, the cache folder and its key.

Kept apart from the kernels' Python wrappers (``__init__.py``) so that where code is loaded
from, and what is checked before it runs, is decided in one small file."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

_SOURCE = Path(__file__).with_name("kernels.c")
_SOURCES = (_SOURCE, Path(__file__).with_name("kernels_impl.h"))
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c99"]
_LIBS = ["-lm"]


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc"):
        if cand and shutil.which(cand):
            return cand
    return None


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags (a shared cache dir must not
    hand one machine's build to another CPU)."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    for base in (os.environ.get("NORMLAB_CACHE"), Path.home() / ".cache" / "normlab"):
        if base:
            try:
                path = Path(base)
                path.mkdir(parents=True, exist_ok=True)
                if os.access(path, os.W_OK):
                    return path
            except OSError:
                pass
    return Path(tempfile.gettempdir()) / f"normlab-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def build(declare) -> ctypes.CDLL:
    """Compile (or reuse from the cache) and load the kernels; ``declare(lib)`` sets their signatures."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    src = b"".join(p.read_bytes() for p in _SOURCES)
    key = hashlib.sha256(src + " ".join(_FLAGS).encode() + version.encode() + _cpu_key().encode()).hexdigest()[:16]
    out_dir = _cache_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    lib_path = out_dir / f"normlab_kernels_{key}.so"
    if not lib_path.exists():
        # build into a private name, then rename: concurrent processes never load half a file
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
        os.close(fd)
        try:
            res = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE), *_LIBS], capture_output=True, text=True,
                                 timeout=300)
            if res.returncode != 0:
                raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-500:]}")
            os.replace(tmp, lib_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(lib_path))
    declare(lib)
    return lib
