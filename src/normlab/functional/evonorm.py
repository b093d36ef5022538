"""EvoNorm-B0 and EvoNorm-S0 (Liu, Brock, Simonyan & Le, NeurIPS 2020, arXiv:2004.02967):
normalization and activation found together by search, as one layer.

Both are built from per-(n, c) moments: B0 merges them over the batch (the batch variance)
and uses them as they are (the instance variance); S0 merges them over groups of channels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _moments, engine
from .._layout import channel_axis, per_channel
from ._common import affine
from .response import position_dims

__all__ = ["evonorm_b0", "evonorm_s0"]


def evonorm_b0(
    x: Tensor,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    v: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-3,
    channel_dim: int = 1,
) -> Tensor:
    r"""EvoNorm-B0 (Liu et al., NeurIPS 2020, arXiv:2004.02967), batch-dependent.

    With s2_b the batch variance per channel (over N and positions) and s2_i the instance
    variance per (n, c) (over positions), both biased::

        y = x / max(sqrt(s2_b + eps), v_c * x + sqrt(s2_i + eps)) * gamma_c + beta_c

    (the maximum is element-wise; the numerator is x itself, not centred). In training
    ``running_var`` (if given) is updated in place, ``(1 - momentum) * rv + momentum * var``
    with the unbiased batch variance (timm's and torch's rule); in eval it replaces s2_b.
    ``v=None`` is the layer without nonlinearity (official ``nonlinearity=False``, timm's
    ``apply_act=False``): only ``gamma * x + beta``, no statistics (the running variance is
    left alone). eps 1e-3 is timm's default (the official code 1e-5). Inputs with positions run
    on the engine (:class:`normlab.engine.EvoB0Stats`, its closed-form backward; x saved); the
    math here is its reference.
    """
    if v is None:
        return affine(x, weight, bias, channel_dim).to(x.dtype)
    dims = position_dims(x, channel_dim, "evonorm_b0")
    cd = channel_axis(x.ndim, channel_dim)
    if engine.route("evob0", x, cd) == "kernels":  # the engine's element map, x saved
        batch = training or running_var is None
        desc = engine.EvoB0Stats(eps, None if batch else running_var)
        desc.reference = lambda x, w, b, v: evonorm_b0(x, None if batch else running_var, w, b, v, training=batch,
                                                       eps=eps, channel_dim=cd)
        y = engine.run(desc, x, cd, (weight, bias, v))
        if training and running_var is not None and momentum is not None:
            _moments.update_running_stats(None, running_var, desc.batch_moments, momentum)
        return y
    inst = _moments.moments(x, dims)  # per (n, c)
    if training or running_var is None:
        batch = _moments.reduce_moments(inst, 0)  # merged over the batch: per channel
        if training and running_var is not None and momentum is not None:
            _moments.update_running_stats(None, running_var, batch, momentum)
        var_b = batch.var
    else:
        var_b = per_channel(running_var, x.ndim, channel_dim)
    right = torch.sqrt(inst.var + eps) + x * per_channel(v, x.ndim, channel_dim)
    y = x / torch.maximum(torch.sqrt(var_b + eps), right)
    return affine(y, weight, bias, channel_dim).to(x.dtype)


def evonorm_s0(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    v: Tensor | None = None,
    *,
    eps: float = 1e-5,
    channel_dim: int = 1,
) -> Tensor:
    r"""EvoNorm-S0 (Liu et al., NeurIPS 2020, arXiv:2004.02967), per sample.

    With s2_g the (biased) variance of sample n over its group of C/G channels and every
    position, as in group norm::

        y = x * sigmoid(v_c * x) / sqrt(s2_g + eps) * gamma_c + beta_c

    No batch statistics: the same in training and eval, batch 1 works. ``v=None`` is the
    layer without nonlinearity (official ``nonlinearity=False``, timm's ``apply_act=False``):
    only ``gamma * x + beta``. Groups 32 and eps 1e-5 are the paper's and timm's defaults.
    Inputs with positions run on the engine (:class:`normlab.engine.EvoS0Stats`, its closed-form
    backward; x saved); the math here is its reference.
    """
    if v is None:
        return affine(x, weight, bias, channel_dim).to(x.dtype)
    cd = channel_axis(x.ndim, channel_dim)
    c = x.shape[cd]
    if not isinstance(num_groups, int) or num_groups <= 0 or c % num_groups:
        raise ValueError(f"evonorm_s0: num_groups must be a positive divisor of the {c} channels, got {num_groups!r}")
    if engine.route("evos0", x, cd, num_groups) == "kernels":  # the engine's element map, x saved
        desc = engine.EvoS0Stats(num_groups, eps)
        desc.reference = lambda x, w, b, v: evonorm_s0(x, num_groups, w, b, v, eps=eps, channel_dim=cd)
        return engine.run(desc, x, cd, (weight, bias, v))
    xc = x.movedim(cd, 1)
    xg = xc.reshape(xc.shape[0], num_groups, c // num_groups, -1)  # (N, G, C/G, positions)
    per_nc = _moments.moments(xg, 3)  # per (n, c)
    group = _moments.reduce_moments(per_nc, 2)  # merged over each group's channels: per (n, g)
    inv_std = torch.rsqrt(group.var + eps).expand(xg.shape).reshape(xc.shape).movedim(1, cd)
    y = x * inv_std * torch.sigmoid(x * per_channel(v, x.ndim, channel_dim))
    return affine(y, weight, bias, channel_dim).to(x.dtype)
