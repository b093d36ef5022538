"""Batch normalization: statistics over the batch (and every position), per channel."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import _moments
from .._layout import channel_axis, per_channel
from .._moments import Moments
from .. import engine
from ..engine import BatchStats, dtypes_of, local_only, route, stat_shape
from ._common import affine, batch_moments, batch_statistics, normalize
from .norm_act import activation

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
    act: str | None = None,
    negative_slope: float = 0.01,
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
    normalizes with those of the global batch. ``act`` (relu, leaky_relu with
    ``negative_slope``, silu, gelu) applies an activation to the output, fused into the
    output pass where the engine runs: ``act(batch_norm(x))``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    way = _route(x, cd, running_mean, running_var, weight, bias, momentum, process_group, act)
    if way == "torch":
        f = engine.torch_batch_norm(training, momentum, eps, cd, running_mean is not None and running_var is not None)  # type: ignore[arg-type]
        return activation(f(x, running_mean, running_var, weight, bias), act, negative_slope)
    group = None if local_only(process_group) else process_group
    if way == "kernels":
        fused = engine.epilogue(act, negative_slope)
        if training or running_mean is None or running_var is None:
            desc = BatchStats(eps, process_group=group, stat_shape=stat_shape(x.ndim, cd, x.shape[cd]))
            desc.reference = lambda x, w, b: batch_norm(x, None, None, w, b, eps=eps, channel_dim=cd,
                                                        process_group=group)
            y = engine.run(desc, x, cd, (weight, bias), fused)
            if training and momentum is not None and running_mean is not None:
                _moments.update_running_stats(running_mean, running_var, desc.batch_moments, momentum)
        else:
            y = engine.affine_eval(x, cd, running_mean, running_var, eps, weight, bias, fused)
        if y is not None:
            return y
    mean, var = batch_statistics(x, running_mean, running_var, training, momentum, cd, process_group)
    y = normalize(x, mean, var, eps, weight, bias, cd)
    return activation(y, act, negative_slope)


def _route(x: Tensor, cd: int, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
           bias: Tensor | None, momentum: float | Tensor | None, process_group, act: str | None) -> str:
    return route("bn", x, cd, 1, dtypes_of(running_mean, running_var, weight, bias),
                 (process_group is None, not isinstance(momentum, Tensor), (running_mean is None) == (running_var is None)),
                 engine.fuses(act))


def batch_norm_call(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
                    bias: Tensor | None, *, training: bool, momentum: float | Tensor | None, eps: float,
                    channel_dim: int, process_group=None, act: str | None = None) -> Callable[..., Tensor] | None:
    """The one call of torch's kernel that :func:`batch_norm` makes for inputs of ``x``'s
    signature with these arguments (its "torch" route, e.g. small inputs), ready to apply as
    ``f(x, running_mean, running_var, weight, bias)``; None where another route is taken. Layers
    keep it per input signature (``normlab.layers.base.Norm._cached_call``). ``act`` changes the
    route; ``f`` does not apply it."""
    cd = channel_axis(x.ndim, channel_dim)
    if _route(x, cd, running_mean, running_var, weight, bias, momentum, process_group, act) != "torch":
        return None
    return engine.torch_batch_norm(training, momentum, eps, cd, running_mean is not None and running_var is not None)  # type: ignore[arg-type]


def mean_only_batch_norm(
    x: Tensor,
    running_mean: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | Tensor | None = 0.1,
    channel_dim: int = 1,
    process_group=None,
    act: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""Mean-only batch normalization (Salimans & Kingma, NIPS 2016, arXiv:1602.07868, sec. 3).

    Subtract the per-channel batch mean (over every axis but ``channel_dim``) and add a
    learned bias; no division by a standard deviation (the paper pairs it with weight
    normalization, which already fixes the scale)::

        y = x - mu_c + bias_c           (backward: dx = dy - mean_c(dy))

    In training the batch mean is used and, if ``running_mean`` is given, folded into it in
    place (``running = (1 - momentum) * running + momentum * mu``; the official code's
    0.9 / 0.1 average is ``momentum=0.1``); in eval the running mean is used.
    ``process_group`` all-reduces the moments so that every process uses the global mean.
    ``act`` (relu, leaky_relu with ``negative_slope``, silu, gelu) applies an activation to the
    output, fused into the engine's output pass where the engine runs: ``act(norm(x))``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    if route("mobn", x, cd, 1, dtypes_of(running_mean, bias), (local_only(process_group),)) == "kernels" \
            and local_only(process_group):
        if training or running_mean is None:
            desc = BatchStats(0.0, mean_only=True)
            desc.reference = lambda x, _w, b: mean_only_batch_norm(x, None, b, channel_dim=cd)
            y = engine.run(desc, x, cd, (None, bias), engine.epilogue(act, negative_slope))
            if training and momentum is not None and running_mean is not None:
                _moments.update_running_stats(running_mean, None, desc.batch_moments, momentum)
            return y
        fused = engine.epilogue(act, negative_slope)
        y = engine.affine_eval(x, cd, running_mean, None, 0.0, None, bias, fused)
        if y is not None:
            return y
    if training or running_mean is None:
        m = batch_moments(x, cd, process_group)
        if training and momentum is not None and running_mean is not None and _has_values(m):
            _moments.update_running_stats(running_mean, None, m, momentum)
        mean = m.mean
    else:
        mean = per_channel(running_mean, x.ndim, cd)
    return activation(affine(x - mean, None, bias, cd).to(x.dtype), act, negative_slope)


def batch_renorm_limits(
    step: Tensor | int,
    r_max: float = 3.0,
    d_max: float = 5.0,
    warmup_steps: int = 0,
    ramp_steps: int | tuple[int, int] = 0,
) -> tuple[Tensor, Tensor]:
    r"""The clipping limits ``(r_max_t, d_max_t)`` batch renorm uses at training step ``step``.

    ``step`` counts the training steps before this one (0 for the first). Ioffe (2017,
    sec. 4) trains "with batchnorm alone" first, then relaxes the bounds: ``r_max_t = 1`` and
    ``d_max_t = 0`` for ``step < warmup_steps``, then linearly to the final ``r_max`` and
    ``d_max`` over ``ramp_steps`` steps (a pair gives separate ramps for r and d: the paper's
    Inception run reached r_max = 3 at 40k steps and d_max = 5 at 25k after 5k steps of
    plain batch norm, i.e. ``warmup_steps=5000, ramp_steps=(35000, 20000)``). With
    ``warmup_steps = ramp_steps = 0`` the final limits apply from the first step. Returned
    as 0-dim float tensors, so a tensor ``step`` needs no host synchronization.
    """
    r_ramp, d_ramp = ramp_steps if isinstance(ramp_steps, tuple) else (ramp_steps, ramp_steps)
    s = torch.as_tensor(step, dtype=torch.float64) - warmup_steps

    def progress(ramp: int) -> Tensor:
        return (s >= 0).to(s.dtype) if ramp == 0 else (s / ramp).clamp(0.0, 1.0)

    return 1.0 + (r_max - 1.0) * progress(r_ramp), d_max * progress(d_ramp)


def batch_renorm(
    x: Tensor,
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = True,
    momentum: float | Tensor | None = 0.01,
    r_max: float | Tensor = 3.0,
    d_max: float | Tensor = 5.0,
    eps: float = 1e-5,
    channel_dim: int = 1,
    process_group=None,
    act: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""Batch renormalization (Ioffe, NIPS 2017, arXiv:1702.03275, Algorithm 1).

    Per channel, with batch moments ``mu_B``, ``sigma_B = sqrt(var_B + eps)`` (biased
    variance) and running ``mu``, ``sigma``::

        r = stop_gradient(clip(sigma_B / sigma, 1 / r_max, r_max))
        d = stop_gradient(clip((mu_B - mu) / sigma, -d_max, d_max))
        y = weight * ((x - mu_B) / sigma_B * r + d) + bias

    then ``mu += momentum * (mu_B - mu)`` and ``sigma += momentum * (sigma_B - sigma)``: the
    paper averages the standard deviation, not the variance. In eval
    ``y = weight * (x - mu) / sigma + bias``. With ``r_max = 1, d_max = 0`` the training
    output and its gradients are batch norm's.

    ``running_var`` keeps torch's name and meaning for the eval map: it stores
    ``sigma^2 - eps``, so that ``sqrt(running_var + eps)`` is the running ``sigma`` and
    eval is the same expression as batch norm's (a torch batch norm's state_dict loads and
    evaluates identically). ``momentum`` is the weight of this batch (None: no update);
    ``process_group`` all-reduces the batch moments.
    ``act`` (relu, leaky_relu with ``negative_slope``, silu, gelu) applies an activation to the
    output, fused into the engine's output pass where the engine runs: ``act(norm(x))``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    if running_mean is None or running_var is None:
        raise ValueError("batch_renorm: needs running_mean and running_var (r and d are measured against them)")
    if not training:  # batch norm's eval map
        return batch_norm(x, running_mean, running_var, weight, bias, training=False, eps=eps, channel_dim=cd,
                          act=act, negative_slope=negative_slope)
    group = None if local_only(process_group) else process_group
    shape = stat_shape(x.ndim, cd, x.shape[cd])
    desc = BatchStats(eps, process_group=group, stat_shape=shape)
    fast = route("brn", x, cd) == "kernels"
    fused = engine.epilogue(act, negative_slope) if fast else None  # (an unknown act fails before any update)
    if fast:  # the batch moments first (r and d depend on them), then the engine's batch norm
        mean_nc, m2_nc, count = engine.kernel_moments(x, cd)
        desc.moments_given = (mean_nc, m2_nc)
        m = desc.merge(mean_nc, m2_nc, count, x.dtype)
    else:
        m = batch_moments(x, cd, process_group)
    with torch.no_grad():
        mu_b = m.mean.reshape(-1)
        sigma_b = torch.sqrt(m.var.reshape(-1) + eps)
        sigma = torch.sqrt(running_var.to(sigma_b.dtype) + eps)
        r_max = torch.as_tensor(r_max, dtype=sigma_b.dtype, device=sigma_b.device)
        d_max = torch.as_tensor(d_max, dtype=sigma_b.dtype, device=sigma_b.device)
        r = (sigma_b / sigma).clamp(1.0 / r_max, r_max)
        d = ((mu_b - running_mean.to(mu_b.dtype)) / sigma).clamp(-d_max, d_max)
        if momentum is not None and _has_values(m):
            running_mean.lerp_(mu_b.to(running_mean.dtype), _as_weight(momentum, running_mean))
            sigma = sigma.lerp(sigma_b, _as_weight(momentum, sigma))
            running_var.copy_(sigma * sigma - eps)
    if fast:  # batch norm with weight w r and bias w d + b (the description's renorm): x and (C,) statistics saved
        desc.renorm = (r, d)
        desc.reference = lambda x, w, b: batch_norm(x, None, None, *_renormed(w, b, r, d), eps=eps, channel_dim=cd,
                                                    process_group=group)
        return engine.run(desc, x, cd, (weight, bias), fused)
    return activation(normalize(x, m.mean, m.var, eps, *_renormed(weight, bias, r, d), cd), act, negative_slope)


def _renormed(weight: Tensor | None, bias: Tensor | None, r: Tensor, d: Tensor) -> tuple[Tensor, Tensor]:
    """Batch renorm's map as batch norm's weight and bias:
    ``weight * (x_hat * r + d) + bias  ==  x_hat * (weight * r) + (weight * d + bias)``."""
    if weight is not None:
        r, d = weight * r, weight * d
    return r, d if bias is None else d + bias


def _has_values(m: Moments) -> bool:
    """False for the moments of an empty batch (nothing to fold into running statistics)."""
    return isinstance(m.count, Tensor) or m.count > 0


def _as_weight(factor: float | Tensor, like: Tensor) -> float | Tensor:
    """A lerp weight usable with ``like`` (a tensor weight must share its dtype)."""
    return factor.to(like.dtype) if isinstance(factor, Tensor) else factor
