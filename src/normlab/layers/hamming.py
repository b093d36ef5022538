"""Generalized Hamming layers (Fan, NIPS 2017): the bias is computed from the weights and the
input, so there is no learned bias and no normalization layer; train and eval agree."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

from ..functional import hamming as FH

__all__ = ["GeneralizedHammingLinear", "GeneralizedHammingConv2d"]


def _check(who: str, x: Any, ndim: tuple[int, ...], axis: int, size: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point input, got dtype {x.dtype}")
    if x.ndim not in ndim or x.shape[axis] != size:
        raise ValueError(f"{who}: expected an input of shape {layout}, got {tuple(x.shape)}")


class GeneralizedHammingLinear(nn.Module):
    r"""Dense generalized Hamming layer (Fan 2017, arXiv:1710.10328):
    y = (2/L) W x - mean(w_j) - mean(x), i.e. -GHD(x, w_j) / L per output unit j.

    Input (..., in_features), output (..., out_features). Only ``weight`` is learned
    (initialized as ``nn.Linear``'s); see :func:`normlab.functional.generalized_hamming_linear`.
    """

    def __init__(self, in_features: int, out_features: int, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_features <= 0 or out_features <= 0:
            raise ValueError(f"GeneralizedHammingLinear: sizes must be positive, got ({in_features}, {out_features})")
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        _check(f"GeneralizedHammingLinear({self.in_features}, {self.out_features})", x,
               tuple(range(1, 64)), -1, self.in_features, f"(..., {self.in_features})")
        return FH.generalized_hamming_linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class GeneralizedHammingConv2d(nn.Module):
    r"""2-d convolutional generalized Hamming layer (Fan 2017, arXiv:1710.10328):
    each output is -GHD(x_patch, w)/L over its receptive field (L = C_in kh kw).

    Input (N, C_in, H, W) or (C_in, H, W). Only ``weight`` is learned (initialized as
    ``nn.Conv2d``'s); see :func:`normlab.functional.generalized_hamming_conv2d`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if in_channels <= 0 or out_channels <= 0:
            raise ValueError(f"GeneralizedHammingConv2d: channels must be positive, got ({in_channels}, {out_channels})")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        self.dilation = _pair(dilation)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, *self.kernel_size, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        _check(f"GeneralizedHammingConv2d({self.in_channels}, {self.out_channels})", x, (3, 4), -3,
               self.in_channels, f"(N, {self.in_channels}, H, W)")
        unbatched = x.ndim == 3
        y = FH.generalized_hamming_conv2d(x.unsqueeze(0) if unbatched else x, self.weight, self.stride,
                                          self.padding, self.dilation)
        return y.squeeze(0) if unbatched else y

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}")
