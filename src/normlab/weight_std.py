"""Weight-side normalization for convolutions: weight standardization (Qiao et al. 2019),
scaled weight standardization and the normalizer-free recipe's adaptive gradient clipping
(Brock et al., ICLR 2021 and ICML 2021).

``weight_standardize`` is a ``torch.nn.utils.parametrize`` parametrization: the module keeps
its raw weight as the trained parameter and computes the standardized one on each access;
``remove_weight_standardization`` bakes it in (or restores the raw weight).
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import _moments

__all__ = ["WeightStandardization", "weight_standardize", "remove_weight_standardization", "adaptive_clip_grad_"]

_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


class WeightStandardization(nn.Module):
    r"""The parametrization ``W -> W_hat``, per output unit o over its fan-in.

    Plain (Qiao, Wang, Liu, Shen & Yuille 2019, arXiv:1903.10520)::

        W_hat[o] = (W[o] - mean(W[o])) / sqrt(var(W[o]) + eps)          (biased variance)

    Scaled (Brock, De & Smith, ICLR 2021, arXiv:2101.08692), with a learned per-unit ``gain``
    (init 1) and N the fan-in::

        W_hat[o] = gain[o] * (W[o] - mean(W[o])) / sqrt(N * (var(W[o]) + eps))
    """

    def __init__(self, out_features: int, fan_in: int, scaled: bool = False, eps: float = 1e-5,
                 device: object = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not eps > 0:
            raise ValueError(f"WeightStandardization: eps must be > 0, got {eps!r}")
        self.eps, self.scaled, self.fan_in = eps, scaled, fan_in
        if scaled:
            self.gain = nn.Parameter(torch.ones(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("gain", None)

    def forward(self, w: Tensor) -> Tensor:
        flat = w.reshape(w.shape[0], -1)
        mean, var = _moments.mean_var(flat, 1)
        scale = torch.rsqrt(var + self.eps)
        if self.gain is not None:
            scale = scale * self.gain.unsqueeze(1) / math.sqrt(self.fan_in)
        return ((flat - mean) * scale).to(w.dtype).reshape(w.shape)

    def extra_repr(self) -> str:
        return f"scaled={self.scaled}, eps={self.eps}"


def weight_standardize(module: nn.Module, scaled: bool = False, eps: float = 1e-5) -> nn.Module:
    """Standardize ``module.weight`` (a ``Linear`` or ``Conv1d/2d/3d``, transposed ones excluded)
    per output unit over its fan-in, as a removable parametrization. Returns the module.

    ``scaled=True`` gives scaled WS with a learned gain (at
    ``module.parametrizations.weight[0].gain``). eps 1e-5 is the official WS code's.
    Use it for layers followed by a norm (WS) or in a normalizer-free net (scaled WS).
    """
    who = type(module).__name__
    if not isinstance(module, _WEIGHTED) or getattr(module, "transposed", False):
        raise TypeError(f"weight_standardize: expected a Linear or Conv1d/2d/3d module, got {who}")
    if parametrize.is_parametrized(module, "weight") and any(
        isinstance(p, WeightStandardization) for p in module.parametrizations.weight
    ):
        raise ValueError(f"weight_standardize: this {who} is already weight-standardized")
    w = module.weight
    fan_in = w[0].numel()
    if fan_in < 2 and not scaled:
        raise ValueError(f"weight_standardize: {who} has a fan-in of {fan_in}; a variance needs at least 2 values")
    parametrize.register_parametrization(
        module, "weight", WeightStandardization(w.shape[0], fan_in, scaled, eps, w.device, w.dtype))
    return module


def remove_weight_standardization(module: nn.Module, leave_standardized: bool = True) -> nn.Module:
    """Undo :func:`weight_standardize`: keep the standardized weight (default) or the raw one."""
    if not parametrize.is_parametrized(module, "weight"):
        raise ValueError(f"remove_weight_standardization: {type(module).__name__} is not weight-standardized")
    parametrize.remove_parametrizations(module, "weight", leave_parametrized=leave_standardized)
    return module


@torch.no_grad()
def adaptive_clip_grad_(parameters: Iterable[Tensor] | Tensor, clipping: float = 0.01, eps: float = 1e-3) -> None:
    r"""Adaptive gradient clipping, unit-wise (Brock, De, Smith & Simonyan, ICML 2021, arXiv:2102.06171).

    For each unit i (a row of a weight: every axis but the first; a vector or scalar
    parameter is one unit), with G the gradient and W the parameter::

        if ||G_i|| > clipping * max(||W_i||, eps):   G_i <- clipping * max(||W_i||, eps) * G_i / ||G_i||

    in place, before the optimizer step. Parameters without a gradient are skipped. The
    paper does not clip the final classifier: leave its parameters out.
    """
    if isinstance(parameters, Tensor):
        parameters = [parameters]
    if not clipping > 0:
        raise ValueError(f"adaptive_clip_grad_: clipping must be > 0, got {clipping!r}")
    for p in parameters:
        if p.grad is None:
            continue
        dims = tuple(range(1, p.ndim)) if p.ndim > 1 else None
        w_norm = torch.linalg.vector_norm(p.detach(), dim=dims, keepdim=True).clamp_min(eps)
        g_norm = torch.linalg.vector_norm(p.grad, dim=dims, keepdim=True)
        max_norm = clipping * w_norm
        clipped = p.grad * (max_norm / g_norm.clamp_min(1e-6))
        p.grad.copy_(torch.where(g_norm > max_norm, clipped, p.grad))
