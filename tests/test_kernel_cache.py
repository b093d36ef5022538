"""The kernel cache as a hostile or unlucky user meets it (issue 18, items 1, 3, 4).

Every case runs in a subprocess with its own ``NORMLAB_CACHE`` (and ``HOME``) under
``tmp_path``: a cache folder others can write to is refused (the kernels then compile into
a fresh private temporary folder and the status says why); a library planted under the
expected name, with or without a forged build record, is never used; a truncated library
is moved aside and rebuilt and the process lives. Each run checks the kernels' output
against torch's own group norm, so a library that computed wrongly would fail here too.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from normlab import _kernels
from normlab._kernels import _build

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not _kernels.available(), reason=_kernels.status())]

CHECK = """
    import torch, normlab
    from normlab import _kernels
    from normlab.functional import fast_path
    x = torch.randn(8, 6, 20, 20, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    with fast_path(True):
        y = normlab.functional.group_norm(x, 3)
        z = normlab.functional.batch_norm(x, training=True)
    assert torch.allclose(y, torch.nn.functional.group_norm(x.contiguous(), 3), atol=1e-10), "group norm"
    assert torch.allclose(z, torch.nn.functional.batch_norm(x, None, None, training=True), atol=1e-10), "batch norm"
    print(_kernels.available(), _kernels.status())
"""


# The cases build the library (once, or again after a refusal) at -O0: what they test is the
# cache's handling, the same at any optimization level, and a build then takes seconds instead of
# 30-40 (the builds with the real flags are tests/test_kernels.py's). The flags are part of the
# library's cache key, so these builds never meet the real ones.
UNOPTIMIZED = """
    from normlab._kernels import _build
    _build._FLAGS = [f for f in _build._FLAGS if f != "-O3"] + ["-O0"]
"""


def _run(tmp_path: Path, cache: Path, code: str = CHECK, **extra: str) -> subprocess.CompletedProcess:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {**os.environ, "NORMLAB_CACHE": str(cache), "HOME": str(home), "TMPDIR": str(_private_tmp(tmp_path)),
           **extra}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(UNOPTIMIZED) + textwrap.dedent(code)],
                          capture_output=True, text=True, env=env, timeout=300)


def _private_tmp(tmp_path: Path) -> Path:
    d = tmp_path / "tmp"
    d.mkdir(mode=0o700, exist_ok=True)
    return d


def _built(cache: Path, tmp_path: Path) -> Path:
    res = _run(tmp_path, cache)
    assert res.returncode == 0 and res.stdout.startswith("True normlab CPU kernels loaded\n"), res.stdout + res.stderr
    (lib,) = cache.glob("normlab_kernels_*.so")
    return lib


@pytest.fixture(scope="module")
def seed_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One build, in a cache folder that did not exist: it is created private (mode 0700)."""
    tmp_path = tmp_path_factory.mktemp("seed")
    cache = tmp_path / "new" / "cache"
    _built(cache, tmp_path)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    return cache


def _cached(seed_cache: Path, tmp_path: Path) -> Path:
    """A cache folder holding the seed's library and its build record (as a build leaves them):
    the cases below tamper with it without each paying a build first."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    for f in seed_cache.iterdir():
        shutil.copy2(f, cache / f.name)
    (lib,) = cache.glob("normlab_kernels_*.so")
    res = _run(tmp_path, cache)  # loaded as is, not rebuilt
    assert res.returncode == 0 and res.stdout.startswith("True normlab CPU kernels loaded\n"), res.stdout + res.stderr
    assert lib.read_bytes() == (seed_cache / lib.name).read_bytes()
    return lib


def test_a_cache_folder_others_can_write_is_refused(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    (tmp_path / "home").mkdir()
    (tmp_path / "home").chmod(0o777)  # ~/.cache/normlab below it is refused as well
    res = _run(tmp_path, shared)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("True normlab CPU kernels loaded (compiled into a private temporary folder"), res.stdout
    assert "is writable by others (mode 777" in res.stdout, res.stdout
    assert list(shared.iterdir()) == []  # nothing built in, nothing loaded from it
    assert list(_private_tmp(tmp_path).iterdir()) == []  # the temporary folder is gone once loaded


def test_with_no_private_folder_at_all_torch_kernels_run(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # the cache, the home and the temporary folder all below a folder anyone may write
    home = shared / "home"
    home.mkdir()
    code = CHECK.replace("import torch, normlab", "import os, tempfile, torch, normlab\n    tempfile.tempdir = "
                                                   f"{str(shared)!r}")
    res = _run(tmp_path, shared / "cache", code, HOME=str(home))
    assert res.returncode == 0, res.stderr  # outputs checked against torch's, on torch's kernels
    assert res.stdout.startswith("False normlab CPU kernels unavailable: no private folder to build in"), res.stdout
    assert "is writable by others" in res.stdout
    assert not list(shared.glob("**/*.so")) and not list(shared.glob("normlab-kernels-*"))


def test_a_new_cache_folder_is_created_private(seed_cache: Path) -> None:
    assert stat.S_IMODE(seed_cache.stat().st_mode) == 0o700
    assert [p.name for p in seed_cache.iterdir() if not p.name.startswith("normlab_kernels_")] == []  # no leftovers


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs root to chown")
def test_a_cache_folder_of_another_user_is_refused(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o755)
    os.chown(theirs, 65534, 65534)
    (tmp_path / "home").mkdir(mode=0o755)
    os.chown(tmp_path / "home", 65534, 65534)
    res = _run(tmp_path, theirs)
    assert res.returncode == 0, res.stderr
    assert "private temporary folder" in res.stdout and "owned by uid 65534" in res.stdout, res.stdout
    assert list(theirs.iterdir()) == []


def test_folder_problem_names_a_swappable_parent(tmp_path: Path) -> None:
    parent = tmp_path / "open"
    (parent / "mine").mkdir(parents=True, mode=0o700)
    parent.chmod(0o777)
    assert "writable by others" in _build.folder_problem((parent / "mine").resolve())
    parent.chmod(0o1777)  # sticky, as /tmp: others cannot rename what is ours
    assert _build.folder_problem((parent / "mine").resolve()) is None


def test_leftovers_of_killed_builds_are_swept_once_old(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    old_dir, new_dir = cache / "build-old", cache / "build-new"
    for d in (old_dir, new_dir):
        d.mkdir()
        (d / "unit1.o").write_bytes(b"partial")
    old_tmp, lib = cache / "tmpab12.so.tmp", cache / "normlab_kernels_0123456789abcdef.so"
    old_tmp.write_bytes(b"partial")
    lib.write_bytes(b"a library")
    stale = time.time() - 5 * _build._TIMEOUT_S
    for f in (old_dir, old_tmp, lib):
        os.utime(f, (stale, stale))
    _build._sweep(cache)
    assert sorted(f.name for f in cache.iterdir()) == ["build-new", lib.name]  # a live build and libraries stay


def _no_op_library(tmp_path: Path) -> bytes:
    """A library with every symbol the kernels declare, each doing nothing."""
    names: list[str] = []

    class Recorder:
        def __getattr__(self, name: str) -> object:
            names.append(name)
            return type("Fn", (), {})()

    _kernels._declare(Recorder())  # type: ignore[arg-type]
    src = tmp_path / "noop.c"
    src.write_text("".join(f"int {n}(void) {{ return 0; }}\n" for n in sorted(set(names))))
    out = tmp_path / "noop.so"
    subprocess.run([_build._compiler(), "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out.read_bytes()


@pytest.mark.parametrize("forged_record", [False, True])
def test_a_planted_no_op_library_is_never_used(tmp_path: Path, seed_cache: Path, forged_record: bool) -> None:
    cache = tmp_path / "cache"
    lib = _cached(seed_cache, tmp_path)
    planted = _no_op_library(tmp_path)
    lib.write_bytes(planted)
    if forged_record:  # its size and hash recorded as if built here: the self-test still refuses it
        import hashlib

        Path(str(lib) + ".sha256").write_text(f"{len(planted)} {hashlib.sha256(planted).hexdigest()}\n")
    res = _run(tmp_path, cache)
    assert res.returncode == 0, res.stderr  # the outputs were checked against torch's
    why = "self-test failed" if forged_record else "truncated or replaced"
    assert res.stdout.startswith("True normlab CPU kernels loaded (cached") and why in res.stdout, res.stdout
    assert "moved aside" in res.stdout and "rebuilt" in res.stdout
    (aside,) = [p for p in cache.glob("*.rejected-*") if not p.name.endswith(".sha256")]
    assert aside.read_bytes() == planted and lib.read_bytes() != planted
    again = _run(tmp_path, cache)  # the rebuilt library is used from now on
    assert again.stdout.startswith("True normlab CPU kernels loaded\n"), again.stdout + again.stderr


def test_a_truncated_library_is_rebuilt_and_the_process_lives(tmp_path: Path, seed_cache: Path) -> None:
    cache = tmp_path / "cache"
    lib = _cached(seed_cache, tmp_path)
    whole = lib.read_bytes()
    with open(lib, "r+b") as f:
        f.truncate(len(whole) // 2)
    res = _run(tmp_path, cache)
    assert res.returncode == 0, res.stderr  # (loading the truncated file used to kill it with SIGBUS)
    assert "truncated or replaced" in res.stdout and "rebuilt" in res.stdout, res.stdout
    assert lib.stat().st_size == len(whole)
    again = _run(tmp_path, cache)
    assert again.stdout.startswith("True normlab CPU kernels loaded\n"), again.stdout + again.stderr


def test_a_library_others_can_write_is_not_loaded(tmp_path: Path, seed_cache: Path) -> None:
    cache = tmp_path / "cache"
    lib = _cached(seed_cache, tmp_path)
    lib.chmod(0o666)
    res = _run(tmp_path, cache)
    assert res.returncode == 0 and "not a private regular file" in res.stdout, res.stdout + res.stderr
    assert stat.S_IMODE(lib.stat().st_mode) & 0o022 == 0  # the rebuilt one
