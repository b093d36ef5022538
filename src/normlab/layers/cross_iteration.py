"""Cross-Iteration Batch Normalization as a wrapper of the convolution before it."""

from __future__ import annotations

from collections import deque
from typing import Any

import torch
from torch import Tensor, nn

from .. import _moments
from .. import functional as F
from ..functional.cross_iteration import IterationStats, iteration_stats
from .base import RunningStatsNorm


class CrossIterationBatchNorm(RunningStatsNorm):
    r"""``conv`` followed by Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) (spec ``cbn:k``).

    In training, after ``burnin`` iterations of plain batch norm, the statistics of the
    last ``window`` iterations (this one and ``window - 1`` before it) are pooled, the older
    ones compensated to the current ``conv.weight`` by a first-order Taylor step (see
    :func:`normlab.functional.cross_iteration_batch_norm`). Eval uses running statistics
    updated from each batch alone (momentum 0.1, unbiased variance), as batch norm.

    ``window=4, burnin`` in iterations: the official config keeps 3 previous iterations and
    burns in for 8 epochs. The history is not part of the state dict (it refills within
    ``window - 1`` steps). ``conv`` must be a ``Conv1d/2d/3d`` (channels on axis 1).
    """

    batch_stat_dims = "batch"

    def __init__(self, conv: nn.Module, window: int = 4, burnin: int = 0, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, **kwargs: Any) -> None:
        if not isinstance(conv, nn.modules.conv._ConvNd) or conv.transposed:
            raise TypeError(f"CrossIterationBatchNorm: expected a Conv1d/2d/3d to wrap, got {type(conv).__name__}")
        if not isinstance(window, int) or isinstance(window, bool) or window < 1:
            raise ValueError(f"CrossIterationBatchNorm: window must be an int >= 1, got {window!r}")
        if not isinstance(burnin, int) or burnin < 0:
            raise ValueError(f"CrossIterationBatchNorm: burnin must be an int >= 0 (iterations), got {burnin!r}")
        ref = conv.weight
        kwargs.setdefault("device", ref.device)
        kwargs.setdefault("dtype", ref.dtype)
        super().__init__(conv.out_channels, eps, momentum, affine, True, 1, **kwargs)
        self.conv = conv
        self.window, self.burnin = window, burnin
        self._history: deque[IterationStats] = deque(maxlen=max(window - 1, 0))

    def _describe(self) -> str:
        return f"CrossIterationBatchNorm({self.num_features})"

    def reset_running_stats(self) -> None:
        super().reset_running_stats()
        self._history.clear()

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv(x)
        self.check_input(y)
        if not self.training:
            return F.batch_norm(y, self.running_mean, self.running_var, self.weight, self.bias, training=False,
                                eps=self.eps)
        factor = self._step_factor()
        past = list(self._history) if self.num_batches_tracked > self.burnin else []
        out, mu_t, nu_t = F.cross_iteration_batch_norm(y, self.conv.weight, past, self.weight, self.bias, eps=self.eps)
        count = y.numel() // y.shape[1]
        batch = _moments.Moments(count, mu_t.detach(), (nu_t.detach() - mu_t.detach() ** 2).clamp_min(0) * count)
        _moments.update_running_stats(self.running_mean, self.running_var, batch, factor)
        if self.window > 1:
            self._history.append(iteration_stats(self.conv, x))
        return out

    def extra_repr(self) -> str:
        return f"window={self.window}, burnin={self.burnin}, " + super().extra_repr()
