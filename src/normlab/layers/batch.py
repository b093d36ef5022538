"""Batch-statistic layers: normalize with moments over the batch, per channel."""

from __future__ import annotations

from torch import Tensor

from .. import functional as F
from .base import RunningStatsNorm


class BatchNorm(RunningStatsNorm):
    r"""Batch normalization (Ioffe & Szegedy 2015) for ``(N, C, *)`` input of any rank.

    ``y = weight * (x - E[x]) / sqrt(Var[x] + eps) + bias`` with moments per channel over
    the batch and every position; see :func:`normlab.functional.batch_norm`. One class
    serves torch's ``BatchNorm1d/2d/3d`` cases, with the same state_dict keys
    (``weight``, ``bias``, ``running_mean``, ``running_var``, ``num_batches_tracked``), so a
    torch state_dict loads and gives the same eval output.

    Shape: ``(N, C, *)``, or any layout with ``channel_dim``; output has the input's shape
    and memory format. Eval uses the running statistics (unless
    ``track_running_stats=False``). ``process_group`` synchronizes the batch statistics
    across processes (see ``normlab.convert_sync``).
    """

    batch_stat_dims = "batch"

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, channel_dim: int = 1, process_group=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_dim, **kwargs)
        self.process_group = process_group

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.batch_norm(
            x,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            training=self._uses_batch_stats(),
            momentum=self._step_factor(),
            eps=self.eps,
            channel_dim=self.channel_dim,
            process_group=self.process_group if self.training else None,
        )
