"""Your own data and model in `normlab study`: a complete task.

A task is a ``normlab.study.Task``: where its data comes from (``arrays``, or ``split``
for full control), the model with a norm slot (``build_model``), the loss and the metric
(defaults: cross-entropy and the error rate). The study finds it by ``module:factory``::

    cd examples && normlab study --task custom_task:make_task --norms bn,lnc,none --seeds 3

(``--task`` imports ``custom_task`` from the current folder, or from anywhere on
``PYTHONPATH``, and calls ``make_task()``.) This one is scikit-learn's wine data set
(178 wines, 13 measurements, 3 cultivars) and a two-hidden-layer MLP with a norm after each
hidden layer. For a model you already have, ``normlab.compare(model_fn, train, val, ...)``
needs no task at all (README, "Your model, your data").
"""

from __future__ import annotations

import sys

import numpy as np
import torch
from torch import nn

from normlab.study import Task
from normlab.study.tasks import Split, norm_slot


class WineMLP(Task):
    name = "wine"
    kind = "dense"  # the registry's word: norms that apply to (N, C) features (bn, ln, lnc, rms, ...)
    description = "scikit-learn's wine data, a 13-64-64-3 MLP"
    input_shape = (13,)
    num_classes = 3
    default_epochs = 20
    default_lr = 0.05  # at batch 32, scaled linearly with the batch size
    default_batch_sizes = (4, 16, 64)

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        from sklearn.datasets import load_wine

        d = load_wine()
        return d.data.astype(np.float32), d.target.astype(np.int64)

    def _split(self, seed: int, val_fraction: float, val_max: int, train_subset: int, data_dir: str) -> Split:
        s = super()._split(seed, val_fraction, val_max, train_subset, data_dir)  # shuffled by the seed
        mean = s.x_train.mean(0)  # standardize with the training rows' statistics alone
        scale = (s.x_train - mean).square().mean(0).sqrt().clamp_min(1e-6)
        return Split((s.x_train - mean) / scale, s.y_train, (s.x_val - mean) / scale, s.y_val)

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        hidden = 4 * width
        return nn.Sequential(
            nn.Linear(13, hidden), norm_slot(norm_spec, hidden), nn.ReLU(),
            nn.Linear(hidden, hidden), norm_slot(norm_spec, hidden), nn.ReLU(),
            nn.Linear(hidden, self.num_classes))


def make_task() -> Task:
    return WineMLP()


if __name__ == "__main__":  # python examples/custom_task.py: a short study of this task
    from normlab.cli import main

    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    torch.set_num_threads(1)
    sys.exit(main(["study", "--task", "custom_task:make_task", "--norms", "bn,lnc,none", "--seeds", "3",
                   "--db", "normlab-results/wine.sqlite", *sys.argv[1:]]))
