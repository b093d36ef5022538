"""Optimizer parameter groups that follow the normalization papers' training rules."""

from __future__ import annotations

from typing import Any

from torch import nn

from .layers.base import Norm

__all__ = ["param_groups", "is_norm_layer"]

_TORCH_NORMS = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*, SyncBatchNorm, InstanceNorm*
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer: normlab's (``Norm`` subclasses and
    ``SPDBatchNorm``) or torch's."""
    from .layers.spd import SPDBatchNorm

    return isinstance(module, (Norm, SPDBatchNorm) + _TORCH_NORMS)


def param_groups(
    model: nn.Module, lr: float, weight_decay: float, norm_weight_decay: float = 0.0
) -> list[dict[str, Any]]:
    """Parameter groups for ``torch.optim`` following the papers' rules.

    - ``rho`` of batch-instance norm (Nam & Kim 2018): learning rate ``10 * lr`` and no
      weight decay (the official code's "rho" group); any normlab norm's parameter named
      ``rho`` is taken as one;
    - every other parameter owned directly by a normalization layer (the affine
      ``weight``/``bias``, switchable norm's mixing weights, the SPD bias):
      ``norm_weight_decay`` (0 unless asked), since decaying a scale that the next norm
      undoes only changes the effective learning rate;
    - everything else: ``lr`` and ``weight_decay``.

    Each parameter lands in exactly one group (shared parameters once); empty groups are
    left out. Each group carries a ``name`` ("rho", "norm", "default") for logging.
    """
    buckets: dict[str, list[nn.Parameter]] = {"rho": [], "norm": [], "default": []}
    seen: set[int] = set()
    for module in model.modules():
        norm = is_norm_layer(module)
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if norm and pname == "rho" and isinstance(module, Norm):
                buckets["rho"].append(p)
            elif norm:
                buckets["norm"].append(p)
            else:
                buckets["default"].append(p)
    settings = {
        "rho": {"lr": 10 * lr, "weight_decay": 0.0},
        "norm": {"lr": lr, "weight_decay": norm_weight_decay},
        "default": {"lr": lr, "weight_decay": weight_decay},
    }
    return [{"name": k, "params": v, **settings[k]} for k, v in buckets.items() if v]
