"""A norm followed by dropout and an activation, as one module (what timm's ``*Act`` layers are)."""

from __future__ import annotations

from torch import Tensor, nn


class NormAct(nn.Module):
    """``act(drop(norm(x)))``: what ``normlab.convert`` makes of timm's ``BatchNormAct2d``,
    ``GroupNormAct``, ``LayerNormAct*`` and the like, keeping their dropout and activation
    modules. The norm's state_dict keys gain the ``norm.`` prefix."""

    def __init__(self, norm: nn.Module, drop: nn.Module | None = None, act: nn.Module | None = None) -> None:
        super().__init__()
        self.norm = norm
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.drop(self.norm(x)))
