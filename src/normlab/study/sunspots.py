"""The ``sunspots`` task: one-step-ahead forecasting of yearly sunspot numbers (statsmodels'
data, 1700-2008) with an LSTM whose norm slot is the recurrent layer itself: ``ln``
(``normlab.LayerNormLSTM``), ``bn`` (``normlab.BatchNormLSTM``, recurrent batch norm) or
``none`` (``torch.nn.LSTM``).

The held-out validation set is the final span of the series (extrapolation, not
interpolation); inputs are standardized by ``normlab.InputStandardizer`` fitted on the
training span alone, and the metric is the RMSE on the final span in original units.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from .tasks import Split, Task

__all__ = ["Sunspots", "LSTMForecaster"]

_SLOTS = {"ln": "LayerNormLSTM", "bn": "BatchNormLSTM", "none": None}


class LSTMForecaster(nn.Module):
    """(N, L, 1) windows -> an LSTM layer -> a linear read-out of the last hidden state."""

    def __init__(self, rnn: nn.Module, hidden: int) -> None:
        super().__init__()
        self.rnn = rnn
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])


class Sunspots(Task):
    name = "sunspots"
    kind = "seq"
    metric = "rmse"
    description = "yearly sunspot numbers (statsmodels), one-step LSTM forecaster; RMSE on the final 20% span"
    input_shape = (24, 1)
    window = 24  # years of history per prediction (about two solar cycles)
    default_epochs = 15
    default_lr = 0.05

    def default_norms(self) -> list[str]:
        import normlab

        return [s for s, cls in _SLOTS.items() if cls is None or hasattr(normlab, cls)]

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        from statsmodels.datasets import sunspots

        series = sunspots.load_pandas().data["SUNACTIVITY"].to_numpy(np.float32)
        return series, series

    def _split(self, seed: int, val_fraction: float, val_max: int, train_subset: int, data_dir: str) -> Split:
        from normlab import InputStandardizer

        series, _ = self.arrays(data_dir)
        n_train = len(series) - max(1, round(val_fraction * len(series)))  # the final span is held out
        std = InputStandardizer(1, dim=-1)
        std.fit(torch.from_numpy(series[:n_train]).reshape(-1, 1))
        std.eval()
        with torch.no_grad():
            z = std(torch.from_numpy(series).reshape(-1, 1))  # (T, 1)
        L = self.window
        idx = torch.arange(L, len(series))
        x = torch.stack([z[t - L:t] for t in idx.tolist()])  # (M, L, 1)
        y = z[idx]  # (M, 1)
        train, val = idx < n_train, idx >= n_train
        xt, yt = x[train], y[train]
        if train_subset:
            xt, yt = xt[:train_subset], yt[:train_subset]
        return Split(xt.contiguous(), yt.contiguous(), x[val].contiguous(), y[val].contiguous(), standardizer=std)

    def full_spec(self, spec: str) -> str:
        return spec.strip().lower()  # the slot's names take no argument

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        import normlab

        name = norm_spec.strip().lower()
        if name not in _SLOTS:
            raise ValueError(f"unknown norm {norm_spec!r} for task 'sunspots': its LSTM's norm slot takes "
                             f"{', '.join(_SLOTS)} (LayerNormLSTM, BatchNormLSTM, nn.LSTM)")
        hidden = 2 * width
        cls_name = _SLOTS[name]
        if cls_name is None:
            rnn: nn.Module = nn.LSTM(1, hidden, batch_first=True)
        elif not hasattr(normlab, cls_name):
            raise ValueError(f"task 'sunspots': norm {name!r} needs normlab.{cls_name}, which this normlab lacks")
        elif name == "bn":
            rnn = normlab.BatchNormLSTM(1, hidden, max_length=self.window, batch_first=True)
        else:
            rnn = normlab.LayerNormLSTM(1, hidden, batch_first=True)
        return LSTMForecaster(rnn, hidden)

    def loss(self, out: Tensor, y: Tensor) -> Tensor:
        return nn.functional.mse_loss(out, y)

    def score(self, out: Tensor, y: Tensor, split: Split) -> float:
        inv = split.standardizer.inverse  # type: ignore[union-attr]
        with torch.no_grad():
            return torch.sqrt(((inv(out) - inv(y)) ** 2).double().mean()).item()
