"""Generalized Hamming networks (Lixin Fan, NIPS 2017, arXiv:1710.10328): a neuron's output
is the negative normalized generalized Hamming distance between its input and its weights,
a linear response whose bias is fixed analytically by the weights and the input."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["generalized_hamming_linear", "generalized_hamming_conv2d"]

_Pair = int | Sequence[int]


def generalized_hamming_linear(x: Tensor, weight: Tensor) -> Tensor:
    r"""Generalized Hamming layer, dense (Fan 2017, arXiv:1710.10328, eqs. 1-3).

    With the fuzzy XOR a (+) b = a + b - 2ab and L the fan-in, for input x (..., L) and a
    weight row w (L,)::

        GHD(x, w) = sum_l x_l + w_l - 2 x_l w_l
        y = -GHD(x, w) / L = (2/L) w.x - mean(w) - mean(x)

    i.e. the ordinary linear response (2/L) w.x plus the bias -(mean(w) + mean(x)) that the
    paper fixes analytically (its un-normalized form: w.x + b with b = -(sum w + sum x)/2):
    no learned bias and no batch statistics. ``weight`` is (out_features, L).
    """
    L = weight.shape[-1]
    return F.linear(x, weight * (2.0 / L)) - weight.mean(-1) - x.mean(-1, keepdim=True)


def generalized_hamming_conv2d(
    x: Tensor, weight: Tensor, stride: _Pair = 1, padding: _Pair = 0, dilation: _Pair = 1
) -> Tensor:
    r"""Generalized Hamming layer, 2-d convolution (Fan 2017, arXiv:1710.10328).

    Each output is -GHD(x_patch, w)/L over its receptive field of L = C_in * kh * kw values::

        y = (2/L) conv2d(x, w) - mean(w) - mean(x_patch)

    mean(w) per filter; mean(x_patch) per output position, from the channel sum of x
    convolved with an all-ones kh x kw kernel (zero padding counts as inputs equal to 0,
    as the padded convolution sees them). ``weight`` is (C_out, C_in, kh, kw).
    """
    c_out, c_in, kh, kw = weight.shape
    L = c_in * kh * kw
    y = F.conv2d(x, weight * (2.0 / L), None, stride, padding, dilation)
    ones = torch.full((1, 1, kh, kw), 1.0 / L, dtype=x.dtype, device=x.device)
    x_mean = F.conv2d(x.sum(1, keepdim=True), ones, None, stride, padding, dilation)
    return y - weight.mean((1, 2, 3)).view(1, c_out, 1, 1) - x_mean
