"""normlab's engine: the one fast path every statistics norm shares.

- :mod:`.routing` decides, once per input signature, which backend runs a call: torch's own
  kernel, the engine on the compiled kernels, or the plain reference (its table is the policy).
- :mod:`.describe` holds each norm as a description: its merge of per-(n, c) moments, the
  closed-form adjoint of that merge, the parameters' gradients.
- :mod:`.function` is the one autograd Function (:class:`EngineNorm`) that runs any description,
  with an optional activation epilogue.

This module adds the small helpers the norms' functions call around it: torch's kernels for the
"torch" route, the eval map, the activation epilogue's rule. The engine never imports
``normlab.functional`` (which holds the plain math every engine path is tested against).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import _kernels
from .._layout import per_channel
from .describe import BatchInstanceStats, BatchStats, Description, GlobalResponseStats, GroupStats, SwitchableStats
from .describe_modern import EvoB0Stats, EvoS0Stats, PowerStats
from .function import EngineNorm, kernel_moments, run
from .routing import fast_path, instance_by_batch_norm, is_half, kernel_views, route

__all__ = ["ACTIVATIONS", "BatchInstanceStats", "BatchStats", "Description", "EngineNorm", "EvoB0Stats", "EvoS0Stats",
           "GlobalResponseStats", "GroupStats",
           "PowerStats", "SwitchableStats",
           "activate", "affine_eval", "check_activation", "dtypes_of", "epilogue", "fast_path", "fuses",
           "kernel_moments", "local_only", "route",
           "run", "stat_shape", "torch_batch_norm", "torch_group_norm"]

# name -> f(x, negative_slope): torch's activations as a norm + activation applies them (leaky
# ReLU's default slope 0.01, exact erf GELU); the kernels' epilogue computes the same functions
ACTIVATIONS = {
    "relu": lambda x, s: F.relu(x),
    "leaky_relu": lambda x, s: F.leaky_relu(x, s),
    "silu": lambda x, s: F.silu(x),
    "gelu": lambda x, s: F.gelu(x),
}


def check_activation(act: str) -> None:
    """A ValueError listing the known activations unless ``act`` is one of :data:`ACTIVATIONS`."""
    if act not in ACTIVATIONS:
        raise ValueError(f"unknown activation {act!r}; known: {', '.join(ACTIVATIONS)}")


def fuses(act: str | None) -> bool:
    """Whether the engine applies ``act`` in its output pass (then the route prefers the
    engine): relu, leaky_relu, silu and gelu, in every dtype (the half types' exact GELU on
    mathfn.h's division-free form, nl_gelu_half)."""
    return act in ACTIVATIONS


def epilogue(act: str | None, negative_slope: float = 0.01,
             threshold: Tensor | None = None) -> _kernels.Epilogue | None:
    """The kernels' epilogue argument for ``act`` (relu, leaky_relu, silu, exact gelu; every
    activation the engine knows, :func:`fuses`), None for no activation, a ValueError for an
    unknown name (so that no engine route drops one). ``"tlu"``: FRN's thresholded linear unit
    ``max(y, threshold)`` (Singh & Krishnan 2020) with a per-channel ``threshold`` (a tensor that
    may need a gradient: :func:`run` hands it to the autograd Function, which returns it)."""
    if act is None:
        return None
    if act == "tlu":
        if threshold is None:
            raise ValueError("engine.epilogue('tlu'): needs the threshold tensor (FRN's tau)")
        return _kernels.Epilogue(_kernels.EPILOGUES["tlu"], 0.0, threshold)
    check_activation(act)
    if act == "relu":
        return _kernels.Epilogue(_kernels.EPILOGUES["leaky_relu"], 0.0)
    return _kernels.Epilogue(_kernels.EPILOGUES[act], float(negative_slope))


def dtypes_of(*tensors: Tensor | None) -> tuple:
    """The dtypes of parameters and buffers (None where absent), for :func:`route`."""
    return tuple(None if t is None else t.dtype for t in tensors)


def local_only(process_group) -> bool:
    """True if batch statistics stay local: no group, or one that is not active (torch.distributed
    not initialized, or a group of one process)."""
    if process_group is None:
        return True
    from .. import distributed

    return not distributed.is_active(process_group)


def stat_shape(ndim: int, cd: int, c: int) -> tuple[int, ...]:
    """The shape of per-channel statistics kept broadcastable (the synchronized message's shape)."""
    shape = [1] * ndim
    shape[cd] = c
    return tuple(shape)


def torch_batch_norm(training: bool, momentum: float | None, eps: float, cd: int,
                     running: bool) -> Callable[..., Tensor]:
    """Batch norm as one call of torch's kernel (the "torch" route), ready to apply:
    ``f(x, running_mean, running_var, weight, bias)``, with normlab's rule: batch statistics in
    training or without running ones (``running``: both buffers given), folded into the running
    buffers when training with a momentum. Built once per input signature (layers keep ``f``)."""
    batch = training or not running
    keep = not batch or (training and momentum is not None)
    m = 0.0 if momentum is None else momentum

    def f(x: Tensor, running_mean: Tensor | None, running_var: Tensor | None, weight: Tensor | None,
          bias: Tensor | None) -> Tensor:
        rm, rv = (running_mean, running_var) if keep else (None, None)
        if cd == 1:
            return torch.batch_norm(x, weight, bias, rm, rv, batch, m, eps, False)
        return torch.batch_norm(x.movedim(cd, 1), weight, bias, rm, rv, batch, m, eps, False).movedim(1, cd)

    return f


def torch_group_norm(num_groups: int, eps: float, cd: int, like: Tensor) -> Callable[..., Tensor]:
    """Group norm (layer norm: one group; instance norm: one per channel) as one call of torch's
    kernel (the "torch" route) for inputs of ``like``'s signature, ready to apply: ``f(x, weight,
    bias)``. The route has checked what ``F.group_norm`` checks in Python (more than one value per
    group), so ``f`` calls the kernel directly: torch's group-norm kernel, or with a group per
    channel its instance-norm kernel where ``routing.instance_by_batch_norm`` says that is the
    faster."""
    cudnn = torch.backends.cudnn.enabled
    if num_groups == like.shape[cd] and instance_by_batch_norm(like):
        def g(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
            xm = x if cd == 1 else x.movedim(cd, 1)
            y = torch.instance_norm(xm, weight, bias, None, None, True, 0.0, eps, cudnn)
            return y if cd == 1 else y.movedim(1, cd)

        return g

    def f(x: Tensor, weight: Tensor | None, bias: Tensor | None) -> Tensor:
        if cd == 1:
            return torch.group_norm(x, num_groups, weight, bias, eps, cudnn)
        return torch.group_norm(x.movedim(cd, 1), num_groups, weight, bias, eps, cudnn).movedim(1, cd)

    return f


def affine_eval(x: Tensor, cd: int, mean: Tensor, var: Tensor | None, eps: float, weight: Tensor | None,
                bias: Tensor | None, act: tuple[int, float] | None = None) -> Tensor | None:
    """``act(weight * (x - mean) / sqrt(var + eps) + bias)`` with per-channel constants in one
    pass (``var=None``: ``x - mean + bias``), or None where this does not apply (the caller's
    plain path). Differentiable calls run torch's eval batch-norm kernel (then the activation);
    inference (nothing needs a gradient) runs the compiled kernels, whose output pass also
    applies the activation."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, mean, var, weight, bias))
    if grad or not _kernels.supports(x.dtype):
        if cd != 1 or not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
            return None
        ones = torch.ones_like(mean) if var is None else var
        y = torch.batch_norm(x, weight, bias, mean, ones, False, 0.0, 0.0 if var is None else eps, False)
        return y if act is None else activate(y, act, cd)
    got = kernel_views(x, cd)
    if got is None:
        return None
    c = x.shape[cd]
    scale = torch.ones(c, dtype=torch.float64) if var is None else torch.rsqrt(var.double() + eps)
    scale = scale if weight is None else scale * weight.double()
    y = torch.empty_like(x)
    _kernels.affine(got[1], kernel_views(y, cd)[1], got[0], mean, scale,  # type: ignore[index]
                    torch.zeros_like(scale) if bias is None else bias, act=act)
    return y


def activate(y: Tensor, act: tuple, cd: int) -> Tensor:
    """The epilogue ``act`` applied by torch's own activation (the reference of the kernels'):
    the TLU as ``torch.maximum`` with its threshold per channel (channel axis ``cd``)."""
    code, slope, threshold = act[0], act[1], _kernels.threshold_of(act)
    if threshold is not None:
        return torch.maximum(y, per_channel(threshold, y.ndim, cd).to(y.dtype))
    name = next(n for n, c in _kernels.EPILOGUES.items() if c == code)
    return ACTIVATIONS[name](y, slope)
