"""Mixed layers: batch-instance norm and switchable norm, which combine batch statistics
(running ones in eval) with each sample's own."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as F
from .._layout import spatial_size
from .base import BatchStatNorm


class BatchInstanceNorm(BatchStatNorm):
    r"""Batch-instance normalization (Nam & Kim 2018) for ``(N, C, *positions)`` input.

    ``y = weight * (rho * x_BN + (1 - rho) * x_IN) + bias`` with a learned per-channel gate
    ``rho`` (initialised to 1: pure batch norm). See
    :func:`normlab.functional.batch_instance_norm`. The BN branch keeps torch's running
    statistics (momentum 0.1, unbiased ``running_var``) and uses them in eval; the IN branch
    always uses the sample's own statistics, so the input needs positions (more than one).

    ``rho`` stays in [0, 1] with no action from the user: every forward first clamps it in
    place (outside autograd). The paper clamps after each optimizer step; clamping before
    each use gives every forward the same value and leaves the gradient untouched (a
    ``clamp`` inside the graph would zero the gradient of a ``rho`` that stepped outside and
    strand it there; a sigmoid reparametrization would change the optimization and could
    not start at exactly 1). The paper trains ``rho`` with a 10x learning rate and no
    weight decay (``normlab.param_groups``).
    """

    fuses_activation = True

    min_spatial = 1
    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, channel_dim: int = 1, process_group=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_dim, process_group,
                         **kwargs)
        factory = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        self.rho = nn.Parameter(torch.ones(num_features, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.rho)

    def check_input(self, x: Tensor) -> int:
        cd = super().check_input(x)
        if spatial_size(x, self.channel_dim) < 2:
            raise ValueError(f"{self._describe()}: the instance branch needs more than one position per "
                             f"(sample, channel), got input shape {tuple(x.shape)}")
        return cd

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        # .data: outside autograd and its version counter, so a graph still holding rho stays valid
        self.rho.data.clamp_(0.0, 1.0)
        return F.batch_instance_norm(x, self.rho, self.running_mean, self.running_var, self.weight, self.bias,
                                     **self._batch_call(), **self._act())


class SwitchableNorm(BatchStatNorm):
    r"""Switchable normalization (Luo, Ren & Peng 2019): learned mix of IN, LN and BN moments.

    Parameters ``mean_weight`` and ``var_weight`` (3 each, order instance, layer, batch,
    initialised equal) are softmax-normalized into the weights of the three means and of
    the three variances. See :func:`normlab.functional.switchable_norm`. For ``(N, C)``
    input (no positions) the instance term is dropped and the mix is over layer and batch
    (the official ``SwitchNorm1d``).

    Running statistics (biased variances, momentum 0.1 by default; the official code uses
    0.997 / 0.9 decay, i.e. momentum 0.003 / 0.1) feed the batch part in eval; the
    instance and layer parts always use the sample's own. ``normlab.recalibrate(model,
    batches)`` gives the paper's recommended batch average over ``batches``:
    ``running_var = E[mu_B^2 + var_B] - E[mu_B]^2``.
    """

    fuses_activation = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 track_running_stats: bool = True, channel_dim: int = 1, process_group=None, **kwargs) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, channel_dim, process_group,
                         **kwargs)
        factory = {k: kwargs[k] for k in ("device", "dtype") if k in kwargs}
        self.mean_weight = nn.Parameter(torch.ones(3, **factory))
        self.var_weight = nn.Parameter(torch.ones(3, **factory))

    def reset_parameters(self) -> None:
        super().reset_parameters()
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.switchable_norm(x, self.mean_weight, self.var_weight, self.running_mean, self.running_var,
                                 self.weight, self.bias, **self._batch_call(), **self._act())
