"""Study tasks: a dataset plus a small model with a normalization slot.

A task loads its data as float tensors split into train and validation (the split fixed by
the seed, or a held-out final span for time series), builds a model with a norm after every
hidden conv layer (``Task.build_model(norm_spec, width)``), and scores predictions (error
rate, or RMSE in original units). Tasks are stateless definitions: everything a run needs
comes from its ``CellConfig``.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from ..registry import NormEntry, describe_norms, make_norm, parse_spec, split_ws

__all__ = ["Task", "Split", "get_task", "task_names", "ConvNet", "DataMissingError", "FASHION_DIR", "norm_slot"]

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


class DataMissingError(FileNotFoundError):
    """A task's data set is not on this machine (the message says how to get it)."""


@dataclass(frozen=True)
class Split:
    """Train and validation tensors; ``standardizer`` (regression) maps targets back to
    original units with its ``inverse``."""

    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    standardizer: nn.Module | None = None


def norm_slot(spec: str, num_features: int, **kw: object) -> nn.Module:
    """``make_norm(spec, num_features, **kw)`` without touching the global random stream, so
    every norm leaves the initialisation of the model's other layers the same (paired runs)."""
    with torch.random.fork_rng(devices=[]):
        return make_norm(spec, num_features, **kw)


class ConvNet(nn.Module):
    """conv -> norm -> ReLU blocks (2-D or 1-D), global average pooling, a linear classifier.

    The norm slot follows every conv layer; the classifier (the output layer) has none.
    """

    def __init__(self, in_channels: int, widths: tuple[int, ...], strides: tuple[int, ...], num_classes: int,
                 norm: Callable[[int], nn.Module], dim: int = 2) -> None:
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        layers: list[nn.Module] = []
        c = in_channels
        for w, s in zip(widths, strides):
            layers += [conv(c, w, 3, stride=s, padding=1), norm(w), nn.ReLU()]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.features(x)
        return self.head(h.flatten(2).mean(-1))


class Task:
    """A study task: data plus a model with a norm slot. The built-in tasks and a user's
    (``normlab study --task pkg.module:factory``, the factory returning a ``Task``) use
    this one interface:

    - ``split(seed, val_fraction, val_max, train_subset, data_dir) -> Split``: float input
      tensors and targets, the split fixed by the seed (default: ``arrays`` shuffled by it);
    - ``build_model(norm_spec, width) -> nn.Module``: a fresh model with ``norm_spec`` in its
      norm slot (default: a ``ConvNet`` over ``input_shape``);
    - ``loss(out, y)`` (default cross-entropy) and ``score(out, y, split) -> float``, lower
      is better, named by ``metric`` (default: the error rate, "error");
    - ``kind``: which registered norms apply ("conv", "dense", "seq": ``applies_to`` in the
      registry), ``groups`` for a bare ``gn``, ``default_epochs``/``default_lr``.
    """

    name: str = ""
    kind: str = "conv"  # the registry's ``applies_to`` word this task's norm slot needs
    metric: str = "error"  # "error" (fraction misclassified) or "rmse"
    description: str = ""
    groups: int = 4  # the group count given to norms whose ``:ARG`` is ``num_groups``
    dim: int = 2
    input_shape: tuple[int, ...] = (1, 8, 8)  # one example's shape
    in_channels: int = 1
    num_classes: int = 10
    widths: tuple[int, ...] = (1, 2, 2)  # multiples of the width
    strides: tuple[int, ...] = (1, 2, 2)
    default_epochs: int = 4
    default_train_subset: int = 0  # 0: the whole training split
    default_lr: float = 0.1  # at batch 32, scaled linearly: the group-norm paper's 0.1 * N / 32
    default_batch_sizes: tuple[int, ...] = (2, 4, 8, 16, 32, 64)
    default_seeds: int = 3  # the fewest that give a paired interval (stats.MIN_SEEDS)
    # the norms a study of this task takes without --norms (bare specs); None: every registered
    # norm that applies to the task's kind, and for a conv task ``default_ws_specs`` with "+ws"
    default_norm_specs: tuple[str, ...] | None = None
    # norms a conv task also takes with their convs weight-standardized ("gn:G+ws": GN + WS,
    # Qiao et al. 2019, the micro-batch recipe of BiT)
    default_ws_specs: tuple[str, ...] = ("gn",)

    # ------------------------------------------------------------------ data
    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole labelled pool (inputs as float32 shaped for the model, int labels)."""
        raise NotImplementedError

    def split(self, seed: int, val_fraction: float, val_max: int, train_subset: int, data_dir: str = "") -> Split:
        return _cached_split(self, seed, val_fraction, val_max, train_subset, data_dir)

    def _split(self, seed: int, val_fraction: float, val_max: int, train_subset: int, data_dir: str) -> Split:
        x, y = self.arrays(data_dir)
        perm = np.random.default_rng(seed).permutation(len(x))
        n_val = min(max(1, round(val_fraction * len(x))), val_max)
        val, train = perm[:n_val], perm[n_val:]
        if train_subset:
            train = train[:train_subset]
        t = torch.from_numpy
        return Split(t(x[train]), t(y[train]), t(x[val]), t(y[val]))

    # ----------------------------------------------------------------- model
    def default_norms(self) -> list[str]:
        """``default_norm_specs`` when the task sets them, else every registered norm whose
        ``applies_to`` includes this task's kind (and, for a conv task, ``default_ws_specs``
        with their convs weight-standardized: ``gn:4+ws``)."""
        if self.default_norm_specs is not None:
            return [self.full_spec(s) for s in self.default_norm_specs]
        specs = [self.spec_for(e) for e in describe_norms() if self.kind in e.applies_to]
        if self.kind == "conv":
            specs += [self.full_spec(f"{s}+ws") for s in self.default_ws_specs]
        return specs

    def spec_for(self, entry: NormEntry) -> str:
        return f"{entry.name}:{self.groups}" if entry.arg == "num_groups" else entry.name

    def full_spec(self, spec: str) -> str:
        """A spec as typed, completed for this task: a bare ``gn`` takes the task's group count
        (``gn+ws`` -> ``gn:4+ws``)."""
        base, ws = split_ws(spec)
        entry, kwargs = parse_spec(base)  # unknown norm: a clear error
        if entry.arg == "num_groups" and ":" not in base:
            return self.spec_for(entry) + "+ws" * ws
        return spec.strip()

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        """The ``ConvNet``; a ``NORM+ws`` spec builds it with NORM, then ``normlab.convert``
        standardizes the weight of the conv before each norm (``make_norm`` cannot see the conv)."""
        base, ws = split_ws(norm_spec)
        parse_spec(base)  # unknown norm: a clear error before anything is built
        model = ConvNet(self.in_channels, tuple(width * m for m in self.widths), self.strides, self.num_classes,
                        lambda c: norm_slot(base, c), dim=self.dim)
        if ws:
            from ..convert import convert

            with torch.random.fork_rng(devices=[]):  # the other layers' initialisation as without +ws
                model = convert(model, norm_spec)
        return model

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return nn.functional.cross_entropy(out, y)

    def score(self, out: Tensor, y: Tensor, split: Split) -> float:
        """Validation metric from the model's outputs on the whole validation set."""
        return (out.argmax(1) != y).double().mean().item()


@lru_cache(maxsize=8)
def _cached_split(task: "Task", seed: int, val_fraction: float, val_max: int, train_subset: int, data_dir: str
                  ) -> Split:
    return task._split(seed, val_fraction, val_max, train_subset, data_dir)


def _standardize_images(x: np.ndarray, scale: float) -> np.ndarray:
    # a fixed affine map (the pixel range), not fitted: no information from the validation split
    return ((x.astype(np.float32) / scale) - 0.5) / 0.5


class Digits(Task):
    name = "digits"
    description = "8x8 handwritten digits shipped in scikit-learn (1797 images), a 3-conv CNN"

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_digits

        d = load_digits()
        return _standardize_images(d.images[:, None], 16.0), d.target.astype(np.int64)


class FashionMNIST(Task):
    name = "fashion-mnist"
    description = "Fashion-MNIST 28x28 from its IDX files (train file; --train-subset keeps it short), a 4-conv CNN"
    input_shape = (1, 28, 28)
    widths = (1, 2, 2, 4)
    strides = (1, 2, 2, 2)
    default_epochs = 2
    default_train_subset = 8000  # of 48000 training images: CPU-sized; --train-subset 0 takes them all

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        root = Path(data_dir or FASHION_DIR)
        found = {}
        for part, stem in (("x", "train-images-idx3-ubyte"), ("y", "train-labels-idx1-ubyte")):
            cands = [root / stem, root / f"{stem}.gz"]
            path = next((p for p in cands if p.is_file()), None)
            if path is None:
                raise DataMissingError(
                    f"fashion-mnist: no {stem}[.gz] in {root}. Install the data set with "
                    f"`apt-get install dataset-fashion-mnist` (it puts the IDX files in {FASHION_DIR}), "
                    f"or pass --data-dir DIR holding the IDX files")
            found[part] = _read_idx(path)
        return _standardize_images(found["x"][:, None], 255.0), found["y"].astype(np.int64)


def _read_idx(path: Path) -> np.ndarray:
    """An IDX file (LeCun's MNIST format; gzipped or not) as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


class MNIST1D(Task):
    name = "mnist1d"
    description = "MNIST-1D (40-point signals) generated locally by the mnist1d package, a 1-D CNN"
    dim = 1
    input_shape = (1, 40)
    widths = (1, 2, 2)
    strides = (1, 2, 2)
    # the default study (`normlab study`, README "The default study"): 13 norms x 3 batch
    # sizes x 3 seeds of 3 epochs, estimated at about 4 minutes on 2 idle cores
    default_epochs = 3
    default_batch_sizes = (8, 32, 128)
    default_seeds = 3
    # fixed, so the default study's size (and time) does not grow with every norm registered;
    # the norms since 2020 (frn, evob0, evos0, grn, pn) are one --norms away
    default_norm_specs = ("bin", "bn", "brn", "gn", "in", "ln", "lnc", "mobn", "none", "on", "rms", "rmsc", "sn")

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        from mnist1d.data import get_dataset_args, make_dataset

        d = make_dataset(get_dataset_args())  # generated locally; get_dataset would download
        x = np.concatenate([d["x"], d["x_test"]]).astype(np.float32)[:, None]
        y = np.concatenate([d["y"], d["y_test"]]).astype(np.int64)
        return x, y


@lru_cache(maxsize=1)
def _all_tasks() -> dict[str, Task]:
    from .sunspots import Sunspots  # imported late: they build on this module
    from .transformer import DigitsTransformer

    return {t.name: t for t in (Digits(), FashionMNIST(), MNIST1D(), Sunspots(), DigitsTransformer())}


def task_names() -> list[str]:
    return sorted(_all_tasks())


_LOADED: dict[str, Task] = {}  # "module:factory" -> the task its factory returned


def _load_task(ref: str) -> Task:
    """A user's task: import ``module`` (from the current folder too) and call ``factory()``."""
    import importlib
    import os
    import sys

    module, _, attr = ref.partition(":")
    if not module or not attr.isidentifier():
        raise ValueError(f"task {ref!r}: expected pkg.module:factory (a function returning a normlab.study.Task)")
    if os.getcwd() not in sys.path:  # `normlab study --task mytask:make` run from the folder holding mytask.py
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module), attr)
    except ImportError as err:
        raise ValueError(f"task {ref!r}: cannot import {module!r}: {err}") from None
    except AttributeError:
        raise ValueError(f"task {ref!r}: module {module!r} has no {attr!r}") from None
    try:
        task = factory() if callable(factory) and not isinstance(factory, Task) else factory
    except Exception as err:  # noqa: BLE001 (the user's code: say whose it is)
        raise ValueError(f"task {ref!r}: {attr}() raised {type(err).__name__}: {err}") from None
    if not isinstance(task, Task):
        raise ValueError(f"task {ref!r}: {attr}() returned {type(task).__name__}, not a normlab.study.Task")
    task.name = ref  # the name a worker process finds it by
    return task


def get_task(name: str) -> Task:
    """The built-in task called ``name``, or a user's ``pkg.module:factory``; a clear error
    naming the known tasks otherwise."""
    if name.startswith("reproduce/"):  # the claims' own tasks (``normlab reproduce``), loaded when named
        from .reproduce.tasks import get_claim_task

        return get_claim_task(name)
    tasks = dict(_all_tasks())
    if name in tasks:
        return tasks[name]
    if ":" in name:
        if name not in _LOADED:
            _LOADED[name] = _load_task(name)
        return _LOADED[name]
    raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(sorted(tasks))}, or pkg.module:factory")
