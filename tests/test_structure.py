"""The shape of the fast machinery: imports inside ``functional/`` flow one way (no circle,
counting imports inside functions too), the lower floors never import ``functional/``, and
the package's autograd Functions are the listed ones (a new one is a conscious choice)."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from pathlib import Path

import torch

import normlab

PKG = Path(normlab.__file__).parent

# every torch.autograd.Function subclass in normlab, by module: ONE for every statistics norm
# (the engine's), and those of the norms that are not per-(sample, channel) moment norms
FUNCTIONS = {
    "normlab.engine.function": {"EngineNorm"},
}
# norms that are not per-(sample, channel) moment norms keep their own Functions
OWN = {
    "normlab.distributed": {"_SyncMoments"},  # the differentiable all-reduce of moments
    "normlab.functional._online_stream": {"OnlineTrain"},
    "normlab.functional.online": {"_OnlineNormalize", "_LayerScaling", "_ActivationClamp"},
    "normlab.functional.spd": {"_SpectralFunction"},
    # element-wise (no statistics): DyT and Derf, one pass each way saving only the input
    "normlab.functional.elementwise": {"_DynamicSquash"},
    # in-place activated batch norm saves only its output: not a moments-and-affine backward
    "normlab.functional.norm_act": {"_BatchNormLeakyReLUInplace"},
    # PowerNorm's approximate backward on the plain path: the reference of the engine's PowerStats
    "normlab.functional.powernorm": {"_PowerNormTrain"},
}


def _imports(path: Path, package: str) -> set[str]:
    """Modules of ``package`` that ``path`` imports anywhere (module level or inside functions)."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                out.add(node.module.split(".")[0])
            else:
                out.update(a.name for a in node.names)
    return out


def test_functional_has_no_import_circle():
    folder = PKG / "functional"
    mods = {p.stem for p in folder.glob("*.py")}
    graph = {p.stem: _imports(p, "functional") & mods for p in folder.glob("*.py")}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, f"import circle in functional/: {' -> '.join(path + [m, n])}"
            if n not in state:
                visit(n, path + [m])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [])


def test_lower_floors_do_not_import_functional():
    for name in ("_moments.py", "_layout.py", "distributed.py", "_kernels/__init__.py", "_kernels/_build.py",
                 "engine/__init__.py", "engine/routing.py", "engine/describe.py", "engine/function.py"):
        text = (PKG / name).read_text()
        assert "functional" not in {n for n in _imports(PKG / name, "")} and "from .functional" not in text, name


def test_the_autograd_functions_are_the_listed_ones():
    found: dict[str, set[str]] = {}
    for info in pkgutil.walk_packages([str(PKG)], prefix="normlab."):
        if ".study" in info.name:  # (the study runner holds no autograd code; it imports optional extras)
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if (inspect.isclass(obj) and issubclass(obj, torch.autograd.Function) and obj.__module__ == mod.__name__
                    and obj is not torch.autograd.Function):
                found.setdefault(mod.__name__, set()).add(name)
    # (modules another helper adds, e.g. modern norms, are held to the same list once merged)
    assert found == {**FUNCTIONS, **OWN}, "a new autograd Function: add it to this list on purpose"
