"""Per-(sample, channel) response norms: Filter Response Normalization with its Thresholded
Linear Unit, and ConvNeXt V2's Global Response Normalization. Neither centres the input nor
uses batch statistics, so both behave the same in training and eval and work at batch 1.

Both read their statistic from the per-(n, c) moments of ``_moments`` (the quadratic mean is
``var + mean^2`` of those moments), the summary the engine computes in one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _moments, engine
from .._layout import channel_axis, per_channel
from ..engine import GlobalResponseStats, GroupStats
from ._common import affine, dims_for
from .norm_act import activation

__all__ = ["filter_response_norm", "global_response_norm", "quadratic_mean"]


def quadratic_mean(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """``mean(x^2)`` over ``dims`` (kept as size-1 axes), from the moments: ``var + mean^2``.

    Half inputs are accumulated and returned in float32, as every moment in normlab.
    """
    m = _moments.moments(x, dims)
    return m.var + m.mean * m.mean


def position_dims(x: Tensor, channel_dim: int, who: str) -> tuple[int, ...]:
    """The position axes (all but batch and channel); an error naming ``who`` if there are none."""
    dims = dims_for(x, channel_dim, "spatial")
    if not dims:  # an empty dim list would mean "every axis" to torch's reductions
        raise ValueError(f"{who}: needs at least one position axis besides batch and channel, "
                         f"got shape {tuple(x.shape)}")
    return dims


def filter_response_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    tau: Tensor | None = None,
    *,
    eps: float = 1e-6,
    learned_eps: Tensor | None = None,
    channel_dim: int = 1,
) -> Tensor:
    r"""Filter Response Normalization + TLU (Singh & Krishnan, CVPR 2020, arXiv:1911.09737).

    Per sample n and channel c, over the positions only (no mean subtracted)::

        nu2_nc = mean(x_nc^2)
        y = gamma_c * x / sqrt(nu2_nc + |eps|) + beta_c
        z = max(y, tau_c)                      (TLU; skipped when ``tau`` is None)

    ``learned_eps`` (a scalar tensor) is the paper's learned epsilon for layers whose
    positions are 1x1 (there ``x / sqrt(nu2)`` is ``sign(x)`` and the gradient vanishes):
    the denominator becomes ``sqrt(nu2 + |eps| + |learned_eps|)``. eps 1e-6 is the paper's
    (timm uses 1e-5).
    """
    dims = position_dims(x, channel_dim, "filter_response_norm")
    cd = channel_axis(x.ndim, channel_dim)
    if learned_eps is None and engine.route("frn", x, cd) == "kernels":
        # the engine: RMS norm per (sample, channel), i.e. one group per channel, uncentred
        # (the TLU in the engine's output pass, its gradient and tau's in its backward passes)
        desc = GroupStats(x.shape[cd], abs(eps), center=False)
        desc.reference = lambda x, w, b: filter_response_norm(x, w, b, eps=eps, channel_dim=cd)
        return engine.run(desc, x, cd, (weight, bias), None if tau is None else engine.epilogue("tlu", threshold=tau))
    nu2 = quadratic_mean(x, dims)
    denom = nu2 + abs(eps)
    if learned_eps is not None:
        denom = denom + learned_eps.abs().to(denom.dtype)
    y = affine(x * torch.rsqrt(denom), weight, bias, channel_dim)
    if tau is not None:
        y = torch.maximum(y, per_channel(tau, x.ndim, channel_dim).to(y.dtype))
    return y.to(x.dtype)


def global_response_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float = 1e-6, channel_dim: int = 1,
    act: str | None = None, negative_slope: float = 0.01,
) -> Tensor:
    r"""Global Response Normalization (Woo et al., CVPR 2023, ConvNeXt V2, arXiv:2301.00808).

    Per sample n: the L2 norm of each channel over the positions, divided by its mean over
    the channels, rescales the input; the residual is inside the layer::

        G_nc = ||x_nc||_2 = sqrt(sum over positions of x^2)
        N_nc = G_nc / (mean_c' G_nc' + eps)
        y = gamma_c * (x * N_nc) + beta_c + x

    gamma and beta start at zero (the official init), so the layer starts as the identity;
    ``weight=None`` means gamma = 1, ``bias=None`` beta = 0. ``act`` (relu, leaky_relu with
    ``negative_slope``, silu, gelu) applies an activation to the output, fused into the
    engine's output pass where the engine runs: ``act(global_response_norm(x))``.
    """
    dims = position_dims(x, channel_dim, "global_response_norm")
    cd = channel_axis(x.ndim, channel_dim)
    if engine.route("grn", x, cd) == "kernels":
        desc = GlobalResponseStats(eps)
        desc.reference = lambda x, w, b: global_response_norm(x, w, b, eps=eps, channel_dim=cd)
        return engine.run(desc, x, cd, (weight, bias), engine.epilogue(act, negative_slope))
    count = 1
    for d in dims:
        count *= x.shape[d]
    sumsq = quadratic_mean(x, dims) * count
    # the smallest normal number keeps sqrt's gradient finite for an all-zero channel
    g = sumsq.clamp_min(torch.finfo(sumsq.dtype).tiny).sqrt()
    n = g / (g.mean(dim=channel_dim % x.ndim, keepdim=True) + eps)
    return activation((affine(x * n, weight, bias, channel_dim) + x).to(x.dtype), act, negative_slope)
