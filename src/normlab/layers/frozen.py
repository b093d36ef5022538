"""Frozen batch norm: fixed running statistics and affine map, eval behaviour in any mode."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from .base import Norm


class FrozenBatchNorm(Norm):
    r"""Batch norm with frozen statistics and affine map (spec ``frozenbn``).

    ``y = weight * (x - running_mean) / sqrt(running_var + eps) + bias`` per channel, in
    training as in eval: ``model.train()`` cannot switch it back to batch statistics (the
    trap of calling ``bn.eval()`` to freeze a torch ``BatchNorm``, which the next
    ``model.train()`` undoes). ``weight``, ``bias``, ``running_mean`` and ``running_var``
    are buffers, as in torchvision's ``FrozenBatchNorm2d``: no optimizer or weight decay
    sees them, and a torchvision state_dict or a torch ``BatchNorm*d`` one (whose
    ``num_batches_tracked`` is dropped) loads. One pass; backward saves only the C per-channel
    scales. See :func:`normlab.functional.frozen_batch_norm`; ``normlab.freeze(model)``
    converts every batch norm of a model, ``normlab.unfreeze(model)`` converts back.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, channel_dim: int = 1,
                 check_finite: bool = False, device: Any = None, dtype: torch.dtype | None = None, *,
                 bias: bool = True) -> None:
        super().__init__(num_features, eps, False, channel_dim, check_finite, device, dtype)
        self.affine = affine
        factory = {"device": device, "dtype": dtype}
        del self._parameters["weight"], self._parameters["bias"]  # buffers here, not parameters
        self.register_buffer("weight", torch.ones(num_features, **factory) if affine else None)
        self.register_buffer("bias", torch.zeros(num_features, **factory) if affine and bias else None)
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.frozen_batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   eps=self.eps, channel_dim=self.channel_dim)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a torch BatchNorm's step count means nothing here
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
