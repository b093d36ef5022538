"""The ``normlab`` command line: ``list``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import normlab
from normlab import cli


def _listed_names(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines() if line and not line[0].isspace() and line[0] != "#"]


def test_list_prints_every_registered_norm(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    avail = normlab.available_norms()
    assert _listed_names(out) == list(avail)
    for name, desc in avail.items():
        assert any(line.startswith(name) and desc in line for line in out.splitlines()), name
    assert "(:num_groups)" in out  # gn says it takes an argument
    for e in normlab.describe_norms():  # each spec with its paper on its line
        assert any(line.startswith(e.name) and e.paper in line for line in out.splitlines()), e.name


def test_list_names_the_methods_that_are_not_specs(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    for name, _, paper in cli.OTHER_METHODS:
        assert f"{name}:" in out and paper in out
        # every object it names exists in the package
        for part in name.replace("normlab.", "").replace("(Cell)", "").split(" / "):
            base = part.split("{")[0]
            if "{" in part:
                for suffix in part.split("{")[1].rstrip("}").split(","):
                    assert hasattr(normlab, base + suffix), base + suffix
            else:
                assert hasattr(normlab, base), base


def test_list_verbose_gives_axes_and_paper(capsys):
    assert cli.main(["list", "-v"]) == 0
    out = capsys.readouterr().out
    for e in normlab.describe_norms():
        assert f"normalizes over: {e.axes}" in out
        assert f"paper: {e.paper}" in out
    assert _listed_names(out) == list(normlab.available_norms())


def test_no_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main([])
    assert info.value.code == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.slow
def test_list_as_a_subprocess():
    src = str(Path(normlab.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "normlab.cli", "list"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _listed_names(proc.stdout) == list(normlab.available_norms())
