"""Weight normalization (Salimans & Kingma, NIPS 2016): a reparameterization of the weights,
not of the activations."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["weight_norm", "norm_except_dim"]


def norm_except_dim(v: Tensor, dim: int | None) -> Tensor:
    """||v|| over every axis but ``dim`` (kept as size-1 axes), or over all of ``v`` when
    ``dim`` is None, shaped so that it broadcasts against ``v``."""
    if dim is None:
        return torch.linalg.vector_norm(v).reshape([1] * v.ndim)
    d = dim % v.ndim
    return torch.linalg.vector_norm(v, dim=[i for i in range(v.ndim) if i != d], keepdim=True)


def weight_norm(v: Tensor, g: Tensor, dim: int | None = 0) -> Tensor:
    r"""Weight normalization (Salimans & Kingma, NIPS 2016, arXiv:1602.07868), eq. (2)::

        w = g * v / ||v||

    one scale g per output unit, the norm taken over every axis of ``v`` but ``dim`` (the
    output-unit axis: 0 for ``Linear`` and ``ConvNd`` weights), or over the whole tensor when
    ``dim`` is None. ``g`` has ``v``'s rank with size-1 axes except ``dim`` (torch's layout).
    Autograd gives the paper's gradients: grad_g = grad_w . v / ||v|| and
    grad_v = (g / ||v||) grad_w - (g grad_g / ||v||^2) v.
    """
    return v * (g / norm_except_dim(v, dim))
