"""Model definitions written by others (torchvision, timm, Hugging Face transformers), loaded
for the tests with random weights (nothing is downloaded), or a skip that says why not.

torchvision's PyPI wheel is built for CUDA torch: on the CPU build its ``__init__`` fails
registering its compiled ops ("operator torchvision::nms does not exist"). Its model code is
plain Python, so where that import fails the package is entered without running its
``__init__`` (a module object for the package, its submodules imported from its folder):
``torchvision.models`` then imports and its compiled ops are never called. timm imports
torchvision's feature-extraction helpers at import time, so it needs the same.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType

import pytest

_TV_SKIP: str | None = None


def _enter_torchvision_without_ops() -> None:
    """Make ``import torchvision.<sub>`` work where ``torchvision/__init__`` cannot run."""
    global _TV_SKIP
    if _TV_SKIP is not None:
        pytest.skip(_TV_SKIP)
    if "torchvision.models" in sys.modules:
        return
    try:
        importlib.import_module("torchvision")
        return
    except ModuleNotFoundError:
        _TV_SKIP = "torchvision is not installed (pip install torchvision==0.28.0 --no-deps)"
    except Exception as err:  # a wheel whose compiled ops do not fit this torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("torchvision")
        if spec is None or not spec.submodule_search_locations:
            _TV_SKIP = f"torchvision failed to import ({err}) and its package folder was not found"
        else:
            package = importlib.util.module_from_spec(spec)  # the package, its __init__ not run
            sys.modules["torchvision"] = package
            try:
                importlib.import_module("torchvision.models")
                return
            except Exception as err2:
                del sys.modules["torchvision"]
                _TV_SKIP = (f"torchvision failed to import ({err}), and its model code without its "
                            f"compiled ops failed too ({type(err2).__name__}: {err2})")
    pytest.skip(_TV_SKIP)


def torchvision_models() -> ModuleType:
    """``torchvision.models``, or a skip with the reason."""
    _enter_torchvision_without_ops()
    return importlib.import_module("torchvision.models")


def torchvision_ops_misc() -> ModuleType:
    """``torchvision.ops.misc`` (``FrozenBatchNorm2d``), or a skip with the reason."""
    _enter_torchvision_without_ops()
    return importlib.import_module("torchvision.ops.misc")


def timm() -> ModuleType:
    """The ``timm`` package, or a skip with the reason."""
    if importlib.util.find_spec("timm") is None:
        pytest.skip("timm is not installed (pip install timm==1.0.31 --no-deps)")
    if importlib.util.find_spec("torchvision") is not None:
        try:
            _enter_torchvision_without_ops()
        except pytest.skip.Exception:
            sys.modules.setdefault("torchvision", None)  # type: ignore[arg-type]  # timm then runs without it
    return importlib.import_module("timm")


def transformers() -> ModuleType:
    """The ``transformers`` package, or a skip with the reason."""
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed (pip install transformers==5.24.0 --no-deps, and its light deps)")
    try:
        return importlib.import_module("transformers")
    except Exception as err:  # a missing light dependency, say
        pytest.skip(f"transformers failed to import: {type(err).__name__}: {err}")
