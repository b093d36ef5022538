"""Normalization followed by an activation: the activation table every fused norm uses, and
in-place activated batch norm (Rota Bulo, Porzi & Kontschieder, CVPR 2018, arXiv:1712.02616),
which keeps only its output for backward."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as TF
from torch import Tensor

from .._layout import channel_axis, per_channel, stat_dims
from ..engine import ACTIVATIONS, check_activation
from ._common import batch_statistics

__all__ = ["ACTIVATIONS", "activation", "batch_norm_leaky_relu_inplace"]


def activation(x: Tensor, act: str | None, negative_slope: float = 0.01) -> Tensor:
    """``act(x)`` for ``act`` in :data:`ACTIVATIONS` (``None``: ``x`` unchanged); an error
    listing them otherwise."""
    if act is None:
        return x
    check_activation(act)
    return ACTIVATIONS[act](x, negative_slope)


class _BatchNormLeakyReLUInplace(torch.autograd.Function):
    """Forward y = leaky(s * x_hat + beta); backward from y alone (x_hat recovered by inversion)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor, mean: Tensor, var: Tensor, eps: float,
                slope: float, abn_eps: float, training: bool, cd: int) -> Tensor:
        scale = weight.abs() + abn_eps
        rstd = torch.rsqrt(var + eps)
        a = per_channel(scale, x.ndim, cd) * rstd
        b = per_channel(bias, x.ndim, cd) - mean * a
        y = torch.addcmul(b, x, a).to(x.dtype)
        TF.leaky_relu_(y, slope)
        ctx.save_for_backward(y, weight, bias, rstd)
        ctx.conf = (slope, abn_eps, training, cd)
        return y

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        # With z = leaky^-1(y) = s x_hat + beta and dz = leaky'(z) dy: dz * z = dy * y, and
        # batch norm's dx = a (dz - mean dz - x_hat mean(dz x_hat)), a = s rstd, is
        # a dz + p z + q with per-channel p, q; only y and the per-channel values are needed.
        y, weight, bias, rstd = ctx.saved_tensors
        slope, abn_eps, training, cd = ctx.conf
        nd = y.ndim
        dims = stat_dims(nd, cd, "batch")
        z = TF.leaky_relu(y, 1.0 / slope)  # leaky^-1(y)
        dz = torch.ops.aten.leaky_relu_backward(dy, z, slope, False)
        scale = per_channel(weight.abs() + abn_eps, nd, cd)
        beta = per_channel(bias, nd, cd)
        sum_dz = dz.sum(dims, keepdim=True)
        sum_dz_xhat = ((dy * y).sum(dims, keepdim=True) - beta * sum_dz) / scale
        a = scale * rstd
        if training:
            count = y.numel() // y.shape[cd]
            p = -a * sum_dz_xhat / (count * scale)
            q = -a * sum_dz / count - p * beta
            dx = dz.mul_(a).addcmul_(z, p).add_(q)
        else:
            dx = dz.mul_(a)
        dw = sum_dz_xhat.reshape(-1) * torch.sign(weight)
        return dx.to(y.dtype), dw, sum_dz.reshape(-1), None, None, None, None, None, None, None


def batch_norm_leaky_relu_inplace(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor,
    bias: Tensor,
    *,
    training: bool = True,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    negative_slope: float = 0.01,
    abn_eps: float = 1e-5,
    channel_dim: int = 1,
) -> Tensor:
    r"""In-place activated batch norm (Rota Bulo et al., CVPR 2018, arXiv:1712.02616).

    Batch norm then leaky ReLU, with the scale made invertible::

        y = leaky_relu((|gamma_c| + abn_eps) * (x - mu_c) / sqrt(sigma2_c + eps) + beta_c, slope)

    Only ``y`` is kept for backward (no copy of ``x`` or of the normalized input): the
    backward inverts the leaky ReLU and the affine map to recover ``x_hat`` and applies
    batch norm's gradient, ``dx = s / sqrt(sigma2 + eps) * (dz - mean dz - x_hat mean(dz x_hat))``.
    So it equals ``leaky_relu(batch_norm(x))`` with weight ``|gamma| + abn_eps``; for
    gamma > 0 that is the unfused result up to ``abn_eps``. Statistics and running updates
    as :func:`normlab.functional.batch_norm` (no process group: the backward's sums would
    need one more all-reduce).
    """
    if not 0 < negative_slope:
        raise ValueError(f"batch_norm_leaky_relu_inplace: negative_slope must be > 0 to be invertible, "
                         f"got {negative_slope!r}")
    cd = channel_axis(x.ndim, channel_dim)
    with torch.no_grad():
        mean, var = batch_statistics(x, running_mean, running_var, training, momentum, cd)
    return _BatchNormLeakyReLUInplace.apply(x, weight, bias, mean, var, eps, negative_slope, abn_eps,
                                            training or running_mean is None, cd)
