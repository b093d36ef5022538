"""Per-sample normalizations: layer, instance, group and RMS norm, and the transformer-style
layer and RMS norm over the channel axis alone. None of them uses batch statistics, so each
behaves the same in training and evaluation (instance norm unless it tracks running stats)."""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .. import _moments, engine
from .._layout import channel_axis
from .._moments import Moments
from ..engine import GroupStats, dtypes_of, route
from ._common import affine, dims_for, normalize
from .norm_act import activation


def _per_sample(norm: str, x: Tensor, cd: int, groups: int, center: bool, weight: Tensor | None,
                bias: Tensor | None, eps: float, act: str | None, negative_slope: float, reference,
                flags: tuple = (), keep_moments: bool = False) -> tuple[Tensor, GroupStats | None] | None:
    """Layer, group, instance or RMS norm on the route :func:`normlab.engine.route` picks:
    ``(y, None)`` from torch's kernel, ``(y, description)`` from the engine (with
    ``keep_moments`` the description keeps the per-(n, c) moments), or None (the caller's plain
    path)."""
    way = _route(norm, x, cd, groups, weight, bias, act, flags)
    if way == "torch":
        return activation(engine.torch_group_norm(groups, eps, cd, x)(x, weight, bias), act, negative_slope), None
    if way != "kernels":
        return None
    desc = GroupStats(groups, eps, center)
    desc.reference, desc.keeps_moments = reference, keep_moments
    return engine.run(desc, x, cd, (weight, bias) if center else (weight,), engine.epilogue(act, negative_slope)), desc


def per_sample_call(norm: str, x: Tensor, groups: int, weight: Tensor | None = None, bias: Tensor | None = None, *,
                    eps: float = 1e-5, channel_dim: int = 1, act: str | None = None,
                    flags: tuple = ()) -> Callable[..., Tensor] | None:
    """The one call of torch's group-norm kernel that layer (``norm="ln"``, one group), group
    (``"gn"``) or instance norm (``"in"``, a group per channel) makes for inputs of ``x``'s
    signature (its "torch" route, e.g. small inputs), ready to apply as ``f(x, weight, bias)``;
    None where another route is taken. Layers keep it per input signature
    (``normlab.layers.base.Norm._cached_call``). ``act`` changes the route; ``f`` does not apply it."""
    cd = channel_axis(x.ndim, channel_dim)
    if _route(norm, x, cd, groups, weight, bias, act, flags) != "torch":
        return None
    return engine.torch_group_norm(groups, eps, cd, x)


def _route(norm: str, x: Tensor, cd: int, groups: int, weight: Tensor | None, bias: Tensor | None, act: str | None,
           flags: tuple) -> str:
    return route(norm, x, cd, groups, dtypes_of(weight, bias), flags, engine.fuses(act))


def layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float = 1e-5, channel_dim: int = 1,
    act: str | None = None, negative_slope: float = 0.01,
) -> Tensor:
    r"""Layer normalization (Ba, Kiros & Hinton, 2016, arXiv:1607.06450), channel-first sense.

    Per sample, over every non-batch axis (C and all positions), with a per-channel affine
    map, as in the group-norm paper (Wu & He 2018): it equals ``group_norm`` with one group::

        y = weight_c * (x - mean_n) / sqrt(var_n + eps) + bias_c

    For the transformer convention (over the channel axis alone) use ``channel_layer_norm``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    fast = _per_sample("ln", x, cd, 1, True, weight, bias, eps, act, negative_slope,
                       lambda x, w, b: layer_norm(x, w, b, eps=eps, channel_dim=cd))
    if fast is not None:
        return fast[0]
    mean, var = _moments.mean_var(x, dims_for(x, cd, "sample"))
    return activation(normalize(x, mean, var, eps, weight, bias, cd), act, negative_slope)

def instance_norm(
    x: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    running_mean: Tensor | None = None,
    running_var: Tensor | None = None,
    *,
    use_input_stats: bool = True,
    momentum: float | Tensor | None = 0.1,
    eps: float = 1e-5,
    channel_dim: int = 1,
    act: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""Instance normalization (Ulyanov, Vedaldi & Lempitsky, 2016, arXiv:1607.08022).

    Per sample n and channel c, over the positions only::

        y = weight_c * (x - mu_nc) / sqrt(sigma2_nc + eps) + bias_c

    The same computation at training and test time. If running buffers are given and
    ``use_input_stats`` is true they are updated with the batch average of the instance
    moments (torch's ``track_running_stats``); ``use_input_stats=False`` normalizes with them.
    """
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm: use_input_stats=False needs running_mean and running_var")
        from .._layout import per_channel

        return activation(normalize(
            x,
            per_channel(running_mean, x.ndim, channel_dim),
            per_channel(running_var, x.ndim, channel_dim),
            eps,
            weight,
            bias,
            channel_dim,
        ), act, negative_slope)
    cd = channel_axis(x.ndim, channel_dim)
    tracking = momentum is not None and (running_mean is not None or running_var is not None)
    c = x.shape[cd]
    fast = _per_sample("in", x, cd, c, True, weight, bias, eps, act, negative_slope,
                       lambda x, w, b: instance_norm(x, w, b, eps=eps, channel_dim=cd), (not tracking,),
                       keep_moments=tracking)
    if fast is not None:
        y, desc = fast
        if tracking and desc is not None:
            # batch average of the per-instance moments (the mean of unbiased variances), as below
            count = desc.count_nc
            _moments.update_running_stats(running_mean, running_var,
                                          Moments(count, desc.mean_nc.mean(0), desc.m2_nc.mean(0)), momentum)
        return y
    m = _moments.moments(x, dims_for(x, cd, "spatial"))
    if momentum is not None and x.numel() > 0 and (running_mean is not None or running_var is not None):
        # batch average of the per-instance moments (the mean of unbiased variances);
        # an empty batch has none to average (torch turns its running stats into NaN)
        _moments.update_running_stats(running_mean, running_var, Moments(m.count, m.mean.mean(0), m.m2.mean(0)), momentum)
    return activation(normalize(x, m.mean, m.var, eps, weight, bias, cd), act, negative_slope)

def group_norm(
    x: Tensor,
    num_groups: int,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    channel_dim: int = 1,
    act: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""Group normalization (Wu & He, ECCV 2018, arXiv:1803.08494).

    The C channels are split into ``num_groups`` groups of consecutive channels; per sample
    and group, statistics over the group's channels and every position::

        x -> (N, G, C/G, *spatial);  mu_ng, sigma2_ng over (C/G, *spatial)
        y = weight_c * (x - mu_ng) / sqrt(sigma2_ng + eps) + bias_c

    ``num_groups=1`` is ``layer_norm``; ``num_groups=C`` is ``instance_norm``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    channels = x.shape[cd]
    if num_groups <= 0 or channels % num_groups:
        raise ValueError(f"group_norm: num_groups={num_groups} must divide the {channels} channels")
    fast = _per_sample("gn", x, cd, num_groups, True, weight, bias, eps, act, negative_slope,
                       lambda x, w, b: group_norm(x, num_groups, w, b, eps=eps, channel_dim=cd))
    if fast is not None:
        return fast[0]
    xg = x.unflatten(cd, (num_groups, channels // num_groups))
    dims = tuple(d for d in range(1, xg.ndim) if d != cd)
    mean, var = _moments.mean_var(xg, dims)
    y = normalize(xg, mean, var, eps, None, None, cd).flatten(cd, cd + 1)
    return activation(affine(y, weight, bias, channel_dim).to(x.dtype), act, negative_slope)

def _rms_eps(eps: float | None, x: Tensor) -> float:
    # torch.nn.RMSNorm's eps=None means the machine epsilon of the input's dtype
    return torch.finfo(x.dtype).eps if eps is None else eps


def rms_norm(
    x: Tensor, weight: Tensor | None = None, *, eps: float | None = 1e-6, channel_dim: int = 1,
    act: str | None = None, negative_slope: float = 0.01,
) -> Tensor:
    r"""RMS normalization (Zhang & Sennrich, NeurIPS 2019, arXiv:1910.07467) per sample.

    Over every non-batch axis, no centring, a per-channel gain::

        y = weight_c * x / sqrt(mean_n(x^2) + eps)
    """
    cd = channel_axis(x.ndim, channel_dim)
    e = _rms_eps(eps, x)
    fast = _per_sample("rms", x, cd, 1, False, weight, None, e, act, negative_slope,
                       lambda x, w: rms_norm(x, w, eps=e, channel_dim=cd))
    if fast is not None:
        return fast[0]
    dims = dims_for(x, cd, "sample")
    ms = x.to(_moments.accumulation_dtype(x.dtype)).square().mean(dims, keepdim=True)
    return activation(normalize(x, None, ms, e, weight, None, cd), act, negative_slope)

def _channel_last_view(x: Tensor, cd: int) -> Tensor | None:
    """``x`` with its channel axis moved last, if that is a contiguous view (no copy)."""
    if cd == x.ndim - 1:  # (no movedim: each view costs a few microseconds on small inputs)
        return x if x.is_contiguous() else None
    moved = x.movedim(cd, -1)
    return moved if moved.is_contiguous() else None


def channel_layer_norm(
    x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *, eps: float = 1e-5, channel_dim: int = 1
) -> Tensor:
    r"""Layer norm over the channel axis alone at each position (transformer, ConvNeXt).

    Ba et al. 2016's layer norm as transformers use it (Vaswani et al. 2017; ConvNeXt,
    Liu et al. 2022): for every sample and position, over the C channels::

        y = weight_c * (x - mean_c(x)) / sqrt(var_c(x) + eps) + bias_c

    With ``channel_dim=-1`` this is ``torch.nn.LayerNorm(C)``. When the channel axis is the
    innermost in memory (channel-last tensors, ``channels_last`` images) it runs on a view:
    the engine's row passes for large bfloat16 inputs (with backward), torch's layer-norm
    kernel otherwise (``normlab.engine.routing``); otherwise the moments come from
    the statistics core.
    """
    torch_call = channel_layer_norm_call(x, weight, bias, eps=eps, channel_dim=channel_dim)
    if torch_call is not None:
        return torch_call(x, weight, bias)
    cd = channel_axis(x.ndim, channel_dim)
    mean, var = _moments.mean_var(x, (cd,))
    return normalize(x, mean, var, eps, weight, bias, channel_dim)


def channel_layer_norm_call(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, *,
                            eps: float = 1e-5, channel_dim: int = 1) -> Callable[..., Tensor] | None:
    """The call :func:`channel_layer_norm` makes for inputs of ``x``'s signature when their channel
    axis is innermost in memory: torch's layer-norm kernel, or the engine's row passes where
    :func:`normlab.engine.route` says "kernels"; ready to apply as ``f(x, weight, bias)``; else
    None (the plain path). Layers keep it per input signature, so a call skips the routing."""
    cd = channel_axis(x.ndim, channel_dim)
    view = _channel_last_view(x, cd)
    if view is None:
        return None
    if route("lnc", view, view.ndim - 1, 1, dtypes_of(weight, bias)) == "kernels":
        return _rows_call(cd, eps, center=True)
    shape, cudnn = (x.shape[cd],), torch.backends.cudnn.enabled
    return _at_channel_axis(lambda x, w, b: torch.layer_norm(x, shape, w, b, eps, cudnn), cd, x.ndim)


def channel_rms_norm_call(x: Tensor, weight: Tensor | None = None, *, eps: float | None = 1e-6,
                          channel_dim: int = 1) -> Callable[..., Tensor] | None:
    """The call :func:`channel_rms_norm` makes for inputs of ``x``'s signature when their
    channel axis is innermost in memory: torch's RMS-norm kernel, or the engine's row passes
    where :func:`normlab.engine.route` says "kernels"; ready to apply as ``f(x, weight)``; else
    None (the plain path). Layers keep it per input signature, so a call skips the routing."""
    cd = channel_axis(x.ndim, channel_dim)
    view = _channel_last_view(x, cd)
    if view is None:
        return None
    if route("rmsc", view, view.ndim - 1, 1, dtypes_of(weight)) == "kernels":
        return _rows_call(cd, _rms_eps(eps, x), center=False)
    shape = (x.shape[cd],)
    return _at_channel_axis(lambda x, w: torch.rms_norm(x, shape, w, eps), cd, x.ndim)


def _at_channel_axis(f: Callable[..., Tensor], cd: int, ndim: int) -> Callable[..., Tensor]:
    """``f``, a call on input whose channel axis is last, for input whose channel axis is ``cd``
    (moved last and back; no move where it is last already: each costs microseconds)."""
    if cd == ndim - 1:
        return f
    return lambda x, *params: f(x.movedim(cd, -1), *params).movedim(-1, cd)


def _rows_call(cd: int, eps: float, center: bool) -> Callable[..., Tensor]:
    """Layer norm (``center``: ``f(x, weight, bias)``) or RMS norm (``f(x, weight)``) over the
    channel axis ``cd`` of an input whose channels are innermost in memory (contiguous with
    ``cd`` last, or channels-last) on the engine's row passes: one read of each row
    forward and backward (torch's CPU RMSNorm is a composite with several full-size
    temporaries; its bfloat16 layer norm is slower than its float32 one)."""

    def reference(r: Tensor, *params: Tensor | None) -> Tensor:
        if center:
            return channel_layer_norm(r, *params, eps=eps, channel_dim=cd)
        return channel_rms_norm(r, *params, eps=eps, channel_dim=cd)

    def call(x: Tensor, *params: Tensor | None) -> Tensor:
        desc = GroupStats(1, eps, center=center)  # one "sample" per position: its C channels
        desc.reference, desc.per_position = reference, True
        return engine.run(desc, x, cd, params)

    return call


def channel_rms_norm(
    x: Tensor, weight: Tensor | None = None, *, eps: float | None = 1e-6, channel_dim: int = 1
) -> Tensor:
    r"""RMS norm over the channel axis alone at each position (Zhang & Sennrich 2019).

    ``y = weight_c * x / sqrt(mean_c(x^2) + eps)``; with ``channel_dim=-1`` this is
    ``torch.nn.RMSNorm(C)`` (whose ``eps=None`` means the dtype's machine epsilon).
    """
    call = channel_rms_norm_call(x, weight, eps=eps, channel_dim=channel_dim)
    if call is not None:
        return call(x, weight)
    cd = channel_axis(x.ndim, channel_dim)
    e = _rms_eps(eps, x)
    ms = x.to(_moments.accumulation_dtype(x.dtype)).square().mean(cd, keepdim=True)
    return normalize(x, None, ms, e, weight, None, channel_dim)
