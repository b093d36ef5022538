"""Mixed normalizations: batch-instance norm interpolates the batch- and instance-normalized
signals; switchable norm mixes instance, layer and batch moments with softmax weights. Both
take the batch part from running statistics in eval and the per-sample parts from the input."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _moments
from .._layout import channel_axis, per_channel, stat_dims
from .._moments import Moments
from ._common import batch_statistics, normalize
from .norm_act import activation
from .. import engine
from ..engine import BatchInstanceStats, SwitchableStats, local_only, route


def _fixed(running_mean: Tensor | None, running_var: Tensor | None, batch_stats: bool) -> tuple[Tensor, Tensor] | None:
    """The running statistics as float64 (1, C) rows, copied (the buffers may change in place
    before the backward), or None for batch statistics."""
    if batch_stats:
        return None
    return (running_mean.detach().double().reshape(1, -1).clone(),  # type: ignore[union-attr]
            running_var.detach().double().reshape(1, -1).clone())  # type: ignore[union-attr]


def batch_instance_norm(
    x: Tensor,
    rho: Tensor,
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
    act: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""Batch-instance normalization (Nam & Kim, NeurIPS 2018, arXiv:1805.07925, eq. 4-5).

    A per-channel gate ``rho`` in [0, 1] mixes the batch-normalized and the
    instance-normalized signal before one affine map::

        x_BN = (x - mu_c) / sqrt(sigma2_c + eps)          over (N, *positions)
        x_IN = (x - mu_nc) / sqrt(sigma2_nc + eps)        over the positions
        y = weight_c * (rho_c * x_BN + (1 - rho_c) * x_IN) + bias_c

    ``rho = 1`` is batch norm, ``rho = 0`` instance norm. The BN branch is batch norm's
    (batch moments in training, folded into the running buffers by ``momentum``; running
    statistics in eval); the IN branch always uses the input's own moments (biased
    variance, no running statistics). The input needs at least one position axis.
    ``rho`` is used as given: keeping it in [0, 1] is the caller's job (the paper clamps it
    after every optimizer step; :class:`normlab.BatchInstanceNorm` does so before use).
    ``act`` (relu, leaky_relu with ``negative_slope``, silu, gelu) applies an activation to the
    output, fused into the engine's output pass where the engine runs: ``act(norm(x))``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    positions = stat_dims(x.ndim, cd, "spatial")
    if not positions:
        raise ValueError(f"batch_instance_norm: the instance branch needs positions (rank >= 3), "
                         f"got shape {tuple(x.shape)}")
    batch_stats = training or running_mean is None or running_var is None
    if local_only(process_group) and route("bin", x, cd) == "kernels":
        fixed = _fixed(running_mean, running_var, batch_stats)
        desc = BatchInstanceStats(eps, fixed)
        running = (None, None) if fixed is None else (fixed[0].reshape(-1), fixed[1].reshape(-1))
        desc.reference = lambda x, r, w, b: batch_instance_norm(x, r, running[0], running[1], w, b,
                                                                training=fixed is None, momentum=None, eps=eps,
                                                                channel_dim=cd)
        y = engine.run(desc, x, cd, (rho, weight, bias), engine.epilogue(act, negative_slope))
        if training and momentum is not None and batch_stats:
            _moments.update_running_stats(running_mean, running_var, desc.batch_moments, momentum)
        return y
    mu_bn, var_bn = batch_statistics(x, running_mean, running_var, training, momentum, cd, process_group)
    mu_in, var_in = _moments.mean_var(x, positions)
    rho = per_channel(rho, x.ndim, cd)
    rstd_bn, rstd_in = torch.rsqrt(var_bn + eps), torch.rsqrt(var_in + eps)
    # Both branches are affine in x for each (sample, channel), so their mixture is one affine
    # map. Written around the instance mean (x - mu_BN = (x - mu_IN) + (mu_IN - mu_BN)) so that
    # no large terms cancel when the mean dwarfs the spread.
    scale = rho * rstd_bn + (1 - rho) * rstd_in
    shift = rho * rstd_bn * (mu_in - mu_bn)
    if weight is not None:
        w = per_channel(weight, x.ndim, cd)
        scale, shift = scale * w, shift * w
    if bias is not None:
        shift = shift + per_channel(bias, x.ndim, cd)
    return activation(((x - mu_in) * scale + shift).to(x.dtype), act, negative_slope)


def switchable_norm(
    x: Tensor,
    mean_weight: Tensor,
    var_weight: Tensor,
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
    act: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""Switchable normalization (Luo, Ren & Peng, ICLR 2019, arXiv:1806.10779, eq. 3-5).

    Instance moments per (sample, channel) over the positions; layer and batch moments
    merged from them exactly (no second pass over ``x``); then softmax-weighted mixtures,
    separate for the means and the variances (order: instance, layer, batch)::

        mu = sum_k softmax(mean_weight)_k mu_k     var = sum_k softmax(var_weight)_k var_k
        y = weight_c * (x - mu) / sqrt(var + eps) + bias_c

    All variances are biased (the official code's unbiased instance variance is a quirk not
    copied). An input without position axes ``(N, C)`` has no instance statistics: the
    instance term is dropped and the softmax runs over (layer, batch) alone, as the
    official ``SwitchNorm1d``. The batch part is batch norm's: batch moments in training
    (all-reduced over ``process_group``), running ones in eval; layer and instance parts
    always come from the input.

    Running statistics (biased, like everything here) are updated as a weighted *merge*
    of the running and batch moments, not a plain average of variances::

        mu_run  <- (1 - f) mu_run + f mu_B
        var_run <- (1 - f) var_run + f var_B + f (1 - f) (mu_B - mu_run)^2

    With ``f = 1/k`` at the k-th batch (``momentum=None`` in a layer, as
    ``normlab.recalibrate`` sets) this is exactly the paper's recommended *batch average*
    ``var_run = E[mu_B^2 + var_B] - E[mu_B]^2`` over the batches seen; with a fixed
    momentum it is the exponentially weighted version (the spread of the batch means is
    what makes biased batch variances estimate the population variance).
    ``act`` (relu, leaky_relu with ``negative_slope``, silu, gelu) applies an activation to the
    output, fused into the engine's output pass where the engine runs: ``act(norm(x))``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    batch_stats = training or running_mean is None or running_var is None
    if local_only(process_group) and route("sn", x, cd) == "kernels":
        fixed = _fixed(running_mean, running_var, batch_stats)
        desc = SwitchableStats(eps, fixed, x.ndim > 2)
        running = (None, None) if fixed is None else (fixed[0].reshape(-1), fixed[1].reshape(-1))
        desc.reference = lambda x, mw, vw, w, b: switchable_norm(x, mw, vw, running[0], running[1], w, b,
                                                                 training=fixed is None, momentum=None, eps=eps,
                                                                 channel_dim=cd)
        y = engine.run(desc, x, cd, (mean_weight, var_weight, weight, bias), engine.epilogue(act, negative_slope))
        if training and momentum is not None and batch_stats:
            m_bn = desc.batch_moments
            _merge_into_running(running_mean, running_var, m_bn.mean, m_bn.var, momentum)
        return y
    positions = stat_dims(x.ndim, cd, "spatial")
    m_in = _moments.moments(x, positions) if positions else _points(x)
    m_ln = _moments.reduce_moments(m_in, cd)
    if batch_stats:
        m_bn = _moments.reduce_moments(m_in, 0)
        if process_group is not None:
            from .. import distributed

            m_bn = distributed.all_reduce_moments(m_bn, process_group)
        mu_bn, var_bn = m_bn.mean, m_bn.var
        if training and momentum is not None and (isinstance(m_bn.count, Tensor) or m_bn.count > 0):
            _merge_into_running(running_mean, running_var, mu_bn, var_bn, momentum)
    else:
        mu_bn, var_bn = per_channel(running_mean, x.ndim, cd), per_channel(running_var, x.ndim, cd)
    means, variances = [m_ln.mean, mu_bn], [m_ln.var, var_bn]
    if positions:
        means.insert(0, m_in.mean)
        variances.insert(0, m_in.var)
    k = len(means)
    wm = torch.softmax(mean_weight[-k:].to(mu_bn.dtype), 0)
    wv = torch.softmax(var_weight[-k:].to(mu_bn.dtype), 0)
    mean = sum(w * m for w, m in zip(wm.unbind(0), means))
    var = sum(w * v for w, v in zip(wv.unbind(0), variances))
    return activation(normalize(x, mean, var, eps, weight, bias, cd), act, negative_slope)


def _points(x: Tensor) -> Moments:
    """Moments of each value alone (an input with no position axes): mean x, M2 0."""
    mean = x.to(_moments.accumulation_dtype(x.dtype))
    return Moments(1, mean, torch.zeros_like(mean))


@torch.no_grad()
def _merge_into_running(
    running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor, factor: float | Tensor
) -> None:
    """Merge batch moments into running ones, the batch weighing ``factor`` (see switchable_norm)."""
    if running_mean is None or running_var is None:
        return
    dtype = running_mean.dtype
    f = factor.to(dtype) if isinstance(factor, Tensor) else factor
    old = Moments(1 - f, running_mean, running_var * (1 - f))
    new = Moments(f, mean.reshape(running_mean.shape).to(dtype), var.reshape(running_var.shape).to(dtype) * f)
    merged = _moments.merge(old, new)  # total weight 1, so m2 is the variance
    running_mean.copy_(merged.mean)
    running_var.copy_(merged.m2)
