"""Batch normalization: statistics over the batch (and every position), per channel."""

from __future__ import annotations

from torch import Tensor

from ._common import batch_statistics, normalize


def batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = 1,
    process_group=None,
) -> Tensor:
    r"""Batch normalization (Ioffe & Szegedy, ICML 2015, arXiv:1502.03167).

    For each channel c, over the batch and every position (every axis but ``channel_dim``)::

        mu_c = mean(x[..., c, ...])      sigma2_c = mean((x - mu_c)^2)   (biased)
        y = weight_c * (x - mu_c) / sqrt(sigma2_c + eps) + bias_c

    In training the batch moments are used and, if running buffers are given, folded into
    them in place: ``running = (1 - momentum) * running + momentum * batch`` with the
    running variance stored unbiased (the paper's Algorithm 2; torch's convention). In
    eval (``training=False``) the running statistics are used instead, making the layer a
    fixed affine map. ``process_group`` all-reduces the moments so that every process
    normalizes with those of the global batch.
    """
    mean, var = batch_statistics(x, running_mean, running_var, training, momentum, channel_dim, process_group)
    return normalize(x, mean, var, eps, weight, bias, channel_dim)
