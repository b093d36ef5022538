"""Building and loading the compiled kernels: the compiler, the cache folder and its key.

Kept apart from the kernels' Python wrappers (``__init__.py``) so that where code is loaded
from, and what is checked before it runs, is decided in one small file:

- the cache folder (``$NORMLAB_CACHE``, else ``~/.cache/normlab``) must be a folder owned by
  this user that nobody else can write to, nor swap out (every folder above it is owned by
  this user or root and not writable by others, unless sticky, as ``/tmp``); it is created
  with mode 0700. Otherwise the kernels are compiled into a fresh private temporary folder
  (``tempfile.mkdtemp``, removed once loaded) and :func:`build` says why;
- each build records its size and SHA-256 next to it; a cached library is loaded only if it
  is a regular file of this user's, not writable by others, whose bytes match that record,
  and it is loaded from a private in-memory copy (``memfd``), so a file truncated or replaced
  meanwhile cannot crash the process (SIGBUS) or swap the code;
- once loaded it must pass a self-test (``_selftest.py``) against plain torch;
- a cached file that fails any of this is moved aside (never loaded again) and rebuilt once.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable

from ._selftest import SelfTestFailed, self_test

_SOURCE = Path(__file__).with_name("kernels.c")
_SOURCES = (_SOURCE, *sorted(Path(__file__).parent.glob("*.h")))  # every header kernels.c includes
# -ffp-contract=fast: a * b + c as one fused multiply-add (-std=c99 alone turns contraction off);
# one rounding fewer, and the half-precision loops, bound by arithmetic, 3-12% faster (one thread).
# -fno-trapping-math: nothing here reads the floating-point exception flags, and without it GCC
# may not evaluate both sides of a select such as leaky ReLU's `v > 0 ? v : sl * v` (the
# multiply could raise a flag the source would not): on a CPU without AVX-512's masked
# arithmetic (AVX2) such loops then stayed scalar with a branch a value, 5-10x slower. Same values.
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c99", "-ffp-contract=fast", "-fno-trapping-math"]
_LINK = ["-shared", "-fopenmp"]
_LIBS = ["-lm"]
# kernels.c's translation units (NL_UNIT: float32, float64, bfloat16, float16), compiled in
# parallel and linked into one library: the build's wall time is that of the slowest unit
# where there are cores for all four, not the sum.
_UNITS = (1, 2, 3, 4)
_TIMEOUT_S = 300
_memfds: list[int] = []  # kept open for the process's life: a reused /proc/self/fd name would hit dlopen's cache


class Rejected(RuntimeError):
    """A cached library that must not be used (not ours, altered, truncated, or wrong)."""


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


def cpu_vectors() -> str:
    """The widest vector extension ``-march=native`` builds the kernels for on this CPU
    ("AVX-512 BF16", "AVX-512", "AVX2", "AVX"; else the machine's name): their speed depends on
    it (the half types' passes are bound by arithmetic, done 16 or 8 floats at a time)."""
    flags: set[str] = set()
    for line in _cpu_key().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[-1].split())
    if "avx512f" in flags:
        return "AVX-512 BF16" if "avx512_bf16" in flags else "AVX-512"
    for name in ("avx2", "avx"):
        if name in flags:
            return name.upper()
    return platform.machine() or "unknown"


def _uid() -> int:
    return os.geteuid() if hasattr(os, "geteuid") else -1


def folder_problem(path: Path) -> str | None:
    """Why ``path`` (an absolute, resolved path) is not a private folder of this user, or None."""
    uid = _uid()
    if uid < 0:
        return None  # no POSIX owners (Windows): nothing to check
    st = os.stat(path)
    if not stat.S_ISDIR(st.st_mode):
        return f"{path} is not a folder"
    if st.st_uid != uid:
        return f"{path} is owned by uid {st.st_uid}, not by this user (uid {uid})"
    if st.st_mode & 0o022:
        return f"{path} is writable by others (mode {stat.S_IMODE(st.st_mode):o}; chmod 700 it)"
    for parent in path.parents:  # a folder above that others may write could have this one swapped
        pst = os.stat(parent)
        if pst.st_uid not in (0, uid):
            return f"{parent} (above {path}) is owned by another user (uid {pst.st_uid})"
        if pst.st_mode & 0o022 and not pst.st_mode & stat.S_ISVTX:
            return f"{parent} (above {path}) is writable by others (mode {stat.S_IMODE(pst.st_mode):o})"
    return None


def _private(base: str | Path) -> tuple[Path | None, str]:
    """``base`` made (mode 0700) and checked: (the folder, "") or (None, why it was refused)."""
    try:
        path = Path(os.path.realpath(os.path.expanduser(str(base))))
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        problem = folder_problem(path)
        if problem is None and not os.access(path, os.W_OK | os.X_OK):
            problem = f"{path} is not writable"
    except (OSError, RuntimeError) as exc:  # RuntimeError: Path.home() with no home
        return None, f"{base}: {exc}"
    return (None, problem) if problem else (path, "")


def cache_dir() -> tuple[Path, str, bool]:
    """The folder to build in: (folder, why the cache was refused or "", whether it is temporary)."""
    refused = []
    candidates: list[Callable[[], str | Path]] = [lambda: os.environ.get("NORMLAB_CACHE", ""),
                                                  lambda: Path.home() / ".cache" / "normlab"]
    for cand in candidates:
        try:
            base = cand()
        except RuntimeError as exc:  # no home folder
            refused.append(str(exc))
            continue
        if not base:
            continue
        path, why = _private(base)
        if path is not None:
            return path, "; ".join(f"cache folder refused: {r}" for r in refused), False
        refused.append(why)
    why = "; ".join(refused) or "no cache folder"
    tmp = Path(os.path.realpath(tempfile.mkdtemp(prefix="normlab-kernels-")))  # 0700, unpredictable name
    problem = folder_problem(tmp)  # (a temporary folder others could swap out is no better)
    if problem:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"no private folder to build in (cache folder refused: {why}; temporary folder "
                           f"refused: {problem})")
    return tmp, f"compiled into a private temporary folder (cache folder refused: {why})", True


def _record(lib_path: Path) -> Path:
    return lib_path.with_name(lib_path.name + ".sha256")


def _read_checked(lib_path: Path) -> bytes:
    """The library's bytes if it is this user's private regular file matching its build record."""
    try:
        size_s, digest = _record(lib_path).read_text().split()
        size = int(size_s)
    except (OSError, ValueError):
        raise Rejected("no valid build record (size and SHA-256) next to it") from None
    fd = os.open(lib_path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (_uid() >= 0 and st.st_uid != _uid()) or st.st_mode & 0o022:
            raise Rejected(f"not a private regular file of this user (mode {stat.S_IMODE(st.st_mode):o}, "
                           f"uid {st.st_uid})")
        if st.st_size != size:
            raise Rejected(f"size {st.st_size} bytes, built as {size} (truncated or replaced)")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(size + 1)
    finally:
        os.close(fd)
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise Rejected("its SHA-256 differs from the one recorded when it was built")
    return data


def _load(data: bytes, fallback: Path, declare: Callable[[ctypes.CDLL], None]) -> ctypes.CDLL:
    """Map ``data`` (a private copy where the OS allows) and declare and self-test it."""
    if hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd"):
        fd = os.memfd_create("normlab_kernels", getattr(os, "MFD_CLOEXEC", 0))
        _memfds.append(fd)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        name = f"/proc/self/fd/{fd}"
    else:  # pragma: no cover - no memfd: the checked file itself
        name = str(fallback)
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise Rejected(f"it does not load: {exc}") from None
    try:
        declare(lib)
        self_test(lib)
    except (AttributeError, SelfTestFailed) as exc:
        _unload(lib)
        raise Rejected(f"self-test failed: {exc}") from None
    return lib


def _unload(lib: ctypes.CDLL) -> None:
    try:
        import _ctypes

        _ctypes.dlclose(lib._handle)  # type: ignore[attr-defined]
    except (ImportError, AttributeError, OSError):  # pragma: no cover
        pass


def _move_aside(lib_path: Path) -> str:
    """Rename a rejected library (and its record) so it is never loaded again; the new name."""
    aside = lib_path.with_name(f"{lib_path.name}.rejected-{time.strftime('%Y%m%d%H%M%S')}-{os.getpid()}")
    for src, dst in ((lib_path, aside), (_record(lib_path), _record(aside))):
        try:
            os.replace(src, dst)
        except FileNotFoundError:
            pass  # another process moved it first
    return aside.name


def _raise_failed(commands: list[list[str]], procs: list[subprocess.Popen], logs: list) -> None:
    for cmd, proc, log in zip(commands, procs, logs):
        if proc.returncode:  # (None while running, 0 when done)
            log.seek(0)
            raise RuntimeError(f"{cmd[0]} failed: {log.read().strip()[-500:]}")


def _run_all(commands: list[list[str]], work: Path) -> None:
    """Run the compiler commands at once (their messages to files in ``work``); the first
    failure, or the timeout, stops the others."""
    logs = [open(work / f"cc{i}.log", "w+") for i in range(len(commands))]
    # each in its own process group: stopping one stops what it started (gcc's cc1, as)
    procs = [subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
             for cmd, log in zip(commands, logs)]
    deadline = time.monotonic() + _TIMEOUT_S
    try:
        while True:
            running = [proc.poll() is None for proc in procs]  # (every one polled: each returncode set)
            _raise_failed(commands, procs, logs)
            if not any(running):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{commands[0][0]} took more than {_TIMEOUT_S} s")
            time.sleep(0.05)
    finally:
        for proc, log in zip(procs, logs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (OSError, AttributeError):  # pragma: no cover - no process groups
                    proc.kill()
                proc.wait()
            log.close()


def _sweep(folder: Path) -> None:
    """Remove what builds killed midway left in ``folder`` (their private work folders and
    temporary files), once older than any live build can be."""
    horizon = time.time() - 4 * _TIMEOUT_S
    for leftover in [*folder.glob("build-*"), *folder.glob("*.so.tmp*")]:
        try:
            st = os.lstat(leftover)
            if st.st_mtime < horizon and st.st_uid == _uid():
                if stat.S_ISDIR(st.st_mode):
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    os.unlink(leftover)
        except OSError:
            pass  # another process swept it first


def _compile(cc: str, folder: Path, lib_path: Path) -> bytes:
    """Build into private names (objects in a private temporary folder inside ``folder``),
    record the library's size and hash, then rename both into place (record first: a reader
    that finds the library finds its record)."""
    _sweep(folder)
    work = Path(tempfile.mkdtemp(prefix="build-", dir=folder))
    tmp = str(work / "kernels.so")
    rec_tmp = tmp + ".sha256"
    try:
        objects = [str(work / f"unit{k}.o") for k in _UNITS]
        _run_all([[cc, *_FLAGS, f"-DNL_UNIT={k}", "-c", "-o", obj, str(_SOURCE)] for k, obj in zip(_UNITS, objects)],
                 work)
        _run_all([[cc, *_LINK, "-o", tmp, *objects, *_LIBS]], work)
        data = Path(tmp).read_bytes()
        Path(rec_tmp).write_text(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n")
        os.replace(rec_tmp, _record(lib_path))
        os.replace(tmp, lib_path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return data


def library_name(cc: str) -> str:
    """The cached library's file name: keyed by the source, the flags, the compiler and the CPU."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    src = b"".join(p.read_bytes() for p in _SOURCES)
    flags = " ".join([*_FLAGS, *_LINK, *map(str, _UNITS)])
    key = hashlib.sha256(src + flags.encode() + version.encode() + _cpu_key().encode()).hexdigest()[:16]
    return f"normlab_kernels_{key}.so"


def build(declare: Callable[[ctypes.CDLL], None]) -> tuple[ctypes.CDLL, str]:
    """Compile (or reuse from the cache) and load the kernels; ``declare(lib)`` sets their
    signatures. Returns the library and a note ("" or what was refused and why)."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC, or install gcc)")
    folder, note, temporary = cache_dir()
    notes = [note] if note else []
    try:
        lib_path = folder / library_name(cc)
        if os.path.lexists(lib_path):
            try:
                return _load(_read_checked(lib_path), lib_path, declare), "; ".join(notes)
            except (Rejected, OSError) as exc:
                notes.append(f"cached {lib_path} rejected ({exc}): moved aside as {_move_aside(lib_path)} "
                             f"and rebuilt")
        data = _compile(cc, folder, lib_path)
        try:
            return _load(data, lib_path, declare), "; ".join(notes)
        except Rejected as exc:
            _move_aside(lib_path)
            raise RuntimeError("; ".join([*notes, f"the fresh build was rejected too ({exc})"])) from None
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
