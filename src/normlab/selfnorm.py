"""Networks without normalization layers: self-normalizing networks (Klambauer et al., NIPS
2017, arXiv:1706.02515) turn a ReLU network into a SELU network whose activations are pulled
toward mean 0, variance 1; normalizer-free networks (Brock et al., ICLR 2021) remove the
norms and standardize the convolutions' weights (scaled WS) with gain-corrected activations."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["self_normalizing", "lecun_normal_", "normalizer_free", "ScaledActivation", "NF_GAINS"]

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


# gamma of each activation, so that act(x) * gamma has unit variance for x ~ N(0, 1)
# (the NFNets reference code's constants)
NF_GAINS: dict[type, float] = {nn.ReLU: 1.7139588594436646, nn.SiLU: 1.7881293296813965, nn.GELU: 1.7015043497085571}


class ScaledActivation(nn.Module):
    """``gain * act(x)``: an activation rescaled to preserve unit variance (NF-ResNets)."""

    def __init__(self, act: nn.Module, gain: float) -> None:
        super().__init__()
        self.act, self.gain = act, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x) * self.gain

    def extra_repr(self) -> str:
        return f"gain={self.gain}"


def _is_norm_layer(m: nn.Module) -> bool:
    from .layers.base import Norm

    return isinstance(m, (Norm, nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                          nn.GroupNorm, nn.LayerNorm, nn.RMSNorm))


@torch.no_grad()
def normalizer_free(model: nn.Module, eps: float = 1e-5) -> nn.Module:
    r"""Make ``model`` normalizer-free, in place (Brock, De & Smith, ICLR 2021, arXiv:2101.08692):

    - every normalization layer (normlab's, torch's batch/instance/group/layer/RMS norms)
      replaced by ``nn.Identity``;
    - every ``Conv1d/2d/3d`` weight given scaled weight standardization with a learned gain
      (:func:`normlab.weight_standardize` with ``scaled=True``); ``Linear`` layers (the
      classifier) are left as they are;
    - every ``nn.ReLU``, ``nn.SiLU`` and ``nn.GELU`` module scaled by its gain gamma
      (:data:`NF_GAINS`), so that a unit-variance input keeps unit variance.

    The NF-ResNet residual form ``h + alpha * f(h / beta)`` needs the block's code and is not
    applied; pair this with adaptive gradient clipping (:func:`normlab.adaptive_clip_grad_`).
    Returns the model (``nn.Identity`` if ``model`` itself is a norm).
    """
    from .weight_std import WeightStandardization, weight_standardize

    if _is_norm_layer(model):
        return nn.Identity()
    convs = [m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed]
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if _is_norm_layer(child):
                setattr(parent, name, nn.Identity())
            elif type(child) in NF_GAINS:
                setattr(parent, name, ScaledActivation(child, NF_GAINS[type(child)]))
    for conv in convs:
        already = nn.utils.parametrize.is_parametrized(conv, "weight") and any(
            isinstance(p, WeightStandardization) for p in conv.parametrizations.weight)
        if not already:
            weight_standardize(conv, scaled=True, eps=eps)
    return model
