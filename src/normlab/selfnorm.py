"""Self-normalizing networks (Klambauer et al., NIPS 2017, arXiv:1706.02515): turn a ReLU
network into a SELU network whose activations are pulled toward mean 0, variance 1."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["self_normalizing", "lecun_normal_"]

_WEIGHTED = (nn.Linear, nn.modules.conv._ConvNd)


@torch.no_grad()
def lecun_normal_(weight: torch.Tensor) -> torch.Tensor:
    """LeCun normal init, w ~ N(0, 1/fan_in): ``kaiming_normal_(nonlinearity="linear")``.

    Not ``nonlinearity="selu"``: torch's SELU gain (3/4) breaks the fixed point the paper's
    analysis needs (sum w = 0, sum w^2 = 1 per unit in expectation).
    """
    return nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="linear")


def _swap(module: nn.Module) -> nn.Module | None:
    if isinstance(module, nn.ReLU):
        return nn.SELU(inplace=module.inplace)
    if type(module) is nn.Dropout:
        return nn.AlphaDropout(module.p)
    if isinstance(module, (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)):
        return nn.FeatureAlphaDropout(module.p)  # whole channels, the same alpha-dropout rule
    return None


@torch.no_grad()
def self_normalizing(model: nn.Module) -> nn.Module:
    r"""Make ``model`` a self-normalizing network (Klambauer et al. 2017), in place.

    - every ``Linear`` and ``ConvNd`` weight re-initialized LeCun normal, N(0, 1/fan_in),
      and its bias set to 0;
    - every ``nn.ReLU`` module replaced by ``nn.SELU``: selu(x) = lambda x for x > 0,
      lambda alpha (e^x - 1) otherwise, alpha = 1.6733, lambda = 1.0507;
    - every ``nn.Dropout`` by ``nn.AlphaDropout`` with the same p (dropped units set to
      -lambda alpha, then an affine fix keeps mean 0 / variance 1), and ``Dropout1d/2d/3d``
      by ``nn.FeatureAlphaDropout``.

    Activations called as functions in ``forward`` (``F.relu``) cannot be seen and stay.
    The paper also assumes standardized inputs (see ``normlab.InputStandardizer``).
    Returns the model (a new module if ``model`` itself is a ReLU or Dropout).
    """
    top = _swap(model)
    if top is not None:
        top.train(model.training)
        return top
    for m in model.modules():
        if isinstance(m, _WEIGHTED):
            lecun_normal_(m.weight)
            if m.bias is not None:
                m.bias.zero_()
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            new = _swap(child)
            if new is not None:
                new.train(child.training)
                setattr(parent, name, new)
    return model
