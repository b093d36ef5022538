"""One study cell's configuration: a frozen, hashable, picklable dataclass.

A cell (one training run) is a pure function of its ``CellConfig``; the stored row holds
every field of it, and its ``key()`` (a hash of every field) is the row's primary key, so a
study resumes by skipping the cells whose key is already stored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, fields
from typing import Any

__all__ = ["CellConfig", "PROTOCOL", "LR_RULES", "NOT_PROTOCOL", "scaled_lr"]

# bump when the training protocol changes in a way that makes old rows incomparable
PROTOCOL = "1"

LR_RULES = ("linear", "sqrt", "none")

# fields that vary within one study (the grid's axes) or do not change what is learned; every
# other field is the study's protocol: runs that share it are compared with each other
NOT_PROTOCOL = frozenset({"key", "norm", "batch_size", "global_batch_size", "seed", "threads", "data_dir"})


@dataclass(frozen=True)
class CellConfig:
    """Everything one run depends on. ``nproc``/``sync`` describe how the batch is spread over
    processes (``nproc`` processes of ``batch_size`` each, batch statistics synchronized
    over them or local); with ``nproc=1`` the cell runs in-process."""

    task: str
    norm: str
    batch_size: int  # per process
    seed: int
    epochs: int
    base_lr: float  # the learning rate at ``base_batch``
    global_batch_size: int = 0  # 0: batch_size * nproc
    nproc: int = 1
    sync: bool = False
    base_batch: int = 32
    lr_rule: str = "linear"
    schedule: str = "cosine"  # "cosine" (to zero over the run) or "constant"
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_batch_size: int = 256
    train_subset: int = 0  # 0: the whole training split
    val_fraction: float = 0.2
    val_max: int = 2000
    width: int = 16
    curve_points: int = 4  # learning-curve points per epoch
    threads: int = 1
    data_dir: str = ""
    protocol: str = PROTOCOL
    # a user's model and data (``normlab.compare``): a hash of the model's module tree and
    # parameter shapes, the data's sizes and a sample of it, the loss and the metric
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.global_batch_size == 0:
            object.__setattr__(self, "global_batch_size", self.batch_size * self.nproc)
        checks = [
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.nproc >= 1, "nproc must be >= 1"),
            (self.global_batch_size == self.batch_size * self.nproc,
             "global_batch_size must equal batch_size * nproc (no gradient accumulation yet)"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.base_lr > 0 and self.base_batch >= 1, "base_lr must be > 0 and base_batch >= 1"),
            (self.lr_rule in LR_RULES, f"lr_rule must be one of {LR_RULES}"),
            (self.schedule in ("cosine", "constant"), "schedule must be 'cosine' or 'constant'"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.train_subset >= 0, "train_subset must be >= 0 (0: all)"),
            (0 < self.val_fraction < 1, "val_fraction must be in (0, 1)"),
            (self.threads >= 1 and self.curve_points >= 1 and self.width >= 1,
             "threads, curve_points and width must be >= 1"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"CellConfig: {msg} (got {self})")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def _hashable(self) -> dict[str, Any]:
        d = self.to_dict()
        if not d["fingerprint"]:  # added later: rows stored before it keep their keys
            del d["fingerprint"]
        return d

    def key(self) -> str:
        """A stable hash of every field: the stored row's primary key."""
        blob = json.dumps(self._hashable(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    def study_key(self) -> str:
        """A hash of the protocol fields (all but ``NOT_PROTOCOL``): the same for every cell
        of one study, whatever its norm, batch size and seed."""
        proto = {k: v for k, v in self._hashable().items() if k not in NOT_PROTOCOL}
        blob = json.dumps(proto, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @property
    def lr(self) -> float:
        return scaled_lr(self.base_lr, self.global_batch_size, self.base_batch, self.lr_rule)

    @classmethod
    def field_types(cls) -> dict[str, type]:
        """Field name -> Python type (for the database schema)."""
        kinds = {"int": int, "float": float, "str": str, "bool": bool}
        return {f.name: kinds[str(f.type)] for f in fields(cls)}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "CellConfig":
        types = cls.field_types()
        kw = {k: types[k](row[k]) for k in types if k in row and row[k] is not None}
        return cls(**kw)

    def label(self) -> str:
        return f"{self.task} {self.norm} bs={self.batch_size} seed={self.seed}"


def scaled_lr(base_lr: float, batch: int, base_batch: int, rule: str) -> float:
    """The learning rate at ``batch`` from ``base_lr`` at ``base_batch``: linear scaling
    (Goyal et al. 2017; the group-norm paper's 0.1 * N / 32), square-root scaling, or none."""
    ratio = batch / base_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * ratio**0.5
    return base_lr
