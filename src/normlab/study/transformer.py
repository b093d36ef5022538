"""The ``transformer`` task: the 8x8 digits read as a sequence of 8 tokens (one per image
row, 8 pixels each), classified by a small pre-norm Transformer encoder (Vaswani et al. 2017;
pre-norm as Xiong et al. 2020): token embedding plus learned positions, ``depth`` blocks of
``h + attention(norm(h))`` and ``h + mlp(norm(h))``, a final norm, mean over tokens, a linear
classifier. Every norm slot is ``make_norm(spec, d, channel_dim=-1)`` on (N, tokens, d):
``lnc``/``rmsc`` are the usual per-token norms, ``bn`` takes its statistics over the batch and
the tokens per channel, ``none`` is the identity; the registry's ``applies_to`` word "seq"
decides which norms the default study tries.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from ..registry import parse_spec
from .tasks import Digits, norm_slot

__all__ = ["DigitsTransformer", "PreNormEncoder"]


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, norm: str) -> None:
        super().__init__()
        self.norm1 = norm_slot(norm, d, channel_dim=-1)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.norm2 = norm_slot(norm, d, channel_dim=-1)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, h: Tensor) -> Tensor:
        y = self.norm1(h)
        h = h + self.attn(y, y, y, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class PreNormEncoder(nn.Module):
    """(N, tokens, token_dim) -> class logits; a norm before every sublayer and at the end."""

    def __init__(self, tokens: int, token_dim: int, d: int, depth: int, heads: int, num_classes: int,
                 norm: str) -> None:
        super().__init__()
        self.embed = nn.Linear(token_dim, d)
        self.pos = nn.Parameter(0.02 * torch.randn(1, tokens, d))
        self.blocks = nn.ModuleList(_Block(d, heads, norm) for _ in range(depth))
        self.norm = norm_slot(norm, d, channel_dim=-1)
        self.head = nn.Linear(d, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.pos
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h).mean(1))


class DigitsTransformer(Digits):
    name = "transformer"
    kind = "seq"
    description = "8x8 digits as 8 tokens of 8 pixels, a 2-block pre-norm Transformer encoder (d = 2 x width)"
    input_shape = (8, 8)
    depth = 2
    heads = 4
    default_epochs = 6
    default_lr = 0.05

    def arrays(self, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = super().arrays(data_dir)
        return np.ascontiguousarray(x[:, 0]), y  # (N, 8 rows, 8 pixels)

    def build_model(self, norm_spec: str, width: int = 16) -> nn.Module:
        parse_spec(norm_spec)
        d = 2 * width
        heads = self.heads if d % self.heads == 0 else 1
        return PreNormEncoder(8, 8, d, self.depth, heads, self.num_classes, norm_spec)
