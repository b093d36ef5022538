"""Weight normalization as a torch parametrization, and the paper's data-dependent init.

Salimans & Kingma, "Weight normalization: a simple reparameterization to accelerate training
of deep neural networks", NIPS 2016 (arXiv:1602.07868); reference code openai/weightnorm.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from .. import _moments
from ..functional import weight as FW

__all__ = ["WeightNorm", "weight_norm", "data_dependent_init", "weight_normalized_modules"]


class WeightNorm(nn.Module):
    """The parametrization w = g v / ||v|| (see :func:`normlab.functional.weight_norm`).

    Registered on a module's ``weight`` it keeps ``parametrizations.weight.original0`` (g)
    and ``original1`` (v), the same keys as ``torch.nn.utils.parametrizations.weight_norm``,
    so state_dicts move between the two (for an integer ``dim``).
    """

    def __init__(self, dim: int | None = 0) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, g: Tensor, v: Tensor) -> Tensor:
        return FW.weight_norm(v, g, self.dim)

    def right_inverse(self, w: Tensor) -> tuple[Tensor, Tensor]:
        # g = ||w|| so that wrapping leaves the weight unchanged
        return FW.norm_except_dim(w, self.dim), w

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Weight-normalize ``module.<name>`` in place: w = g v / ||v|| (Salimans & Kingma 2016).

    ``dim`` is the output-unit axis kept out of the norm (0 for ``Linear`` and ``ConvNd``
    weights, 1 for ``ConvTransposeNd``); ``None`` takes the norm over the whole tensor.
    (Unlike torch's, a negative ``dim`` counts from the end: -1 is the last axis.)
    g starts at ||v||, so the weight is unchanged until :func:`data_dependent_init` or
    training moves it. Returns the module; ``torch.nn.utils.parametrize.remove_parametrizations``
    undoes it.
    """
    w = getattr(module, name, None)
    if not isinstance(w, Tensor):
        raise ValueError(f"weight_norm: {type(module).__name__} has no tensor attribute {name!r}")
    if dim is not None and not -w.ndim <= dim < w.ndim:
        raise ValueError(f"weight_norm: dim={dim} is out of range for {name} of shape {tuple(w.shape)}")
    parametrize.register_parametrization(module, name, WeightNorm(dim), unsafe=True)
    return module


def _wn_parametrization(module: nn.Module, name: str = "weight") -> nn.Module | None:
    if not parametrize.is_parametrized(module, name):
        return None
    plist = module.parametrizations[name]
    if len(plist) != 1:
        return None
    p = plist[0]
    torch_wn = getattr(nn.utils.parametrizations, "_WeightNorm", ())
    return p if isinstance(p, (WeightNorm,) + ((torch_wn,) if torch_wn else ())) else None


def weight_normalized_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every module whose ``weight`` carries normlab's or torch's weight norm."""
    return [(path, m) for path, m in model.named_modules() if _wn_parametrization(m) is not None]


def _output_axis(module: nn.Module, dim: int | None, ndim_out: int) -> int:
    """The axis of the module's output that holds its output units."""
    who = type(module).__name__
    if isinstance(module, nn.Linear) and dim in (0, -2):
        return ndim_out - 1
    if isinstance(module, nn.modules.conv._ConvNd):
        transposed = module.transposed
        if (not transposed and dim == 0) or (transposed and dim == 1 and module.groups == 1):
            return 1
    raise ValueError(
        f"data_dependent_init: {who} weight-normalized with dim={dim} is not supported; expected Linear or "
        f"ConvNd with dim=0, or ConvTransposeNd (groups=1) with dim=1, so that g holds one scale per output unit"
    )


@torch.no_grad()
def data_dependent_init(
    model: nn.Module,
    batch: Any,
    init_scale: float = 1.0,
    v_std: float = 0.05,
    eps: float = 1e-10,
    generator: torch.Generator | None = None,
) -> nn.Module:
    r"""The data-dependent initialization of weight norm (Salimans & Kingma 2016, sec. 3).

    Every weight-normalized ``Linear``/``ConvNd`` layer gets v ~ N(0, ``v_std``^2) (0.05 in
    the official code), g = 1 and b = 0; then one forward pass over ``batch`` initializes
    the layers in the order they run, each from its pre-activations
    t = v.x / ||v|| with the layers before it already initialized::

        mu[t], sigma[t] = mean and std of t per output unit over the batch and positions
        g <- init_scale / sigma[t],   b <- -mu[t] * init_scale / sigma[t]

    so each layer's pre-activations start with zero mean and variance ``init_scale``^2 on
    ``batch`` (``eps`` guards sigma = 0, as the code's 1e-10). A layer without a bias gets
    the scale only. A layer called twice is initialized on its first call. ``batch`` is
    what ``model`` takes (a tuple or list is unpacked into positional arguments). Returns
    the model, with its train/eval mode unchanged.
    """
    layers = weight_normalized_modules(model)
    if not layers:
        raise ValueError("data_dependent_init: the model has no weight-normalized layers (use normlab.weight_norm)")
    for _, m in layers:
        plist = m.parametrizations["weight"]
        g, v = plist.original0, plist.original1
        v.normal_(0.0, v_std, generator=generator)
        g.fill_(1.0)
        if getattr(m, "bias", None) is not None:
            m.bias.zero_()
    done: set[int] = set()

    def hook(module: nn.Module, args: Any, out: Tensor) -> Tensor:
        if id(module) in done:
            return out
        done.add(id(module))
        plist = module.parametrizations["weight"]
        axis = _output_axis(module, _wn_parametrization(module).dim, out.ndim)  # type: ignore[union-attr]
        dims = [d for d in range(out.ndim) if d != axis]
        mean, var = _moments.mean_var(out, dims)
        scale = init_scale / torch.sqrt(var + eps)
        g = plist.original0
        g.copy_(scale.reshape(-1).view(g.shape).to(g.dtype))
        if getattr(module, "bias", None) is not None:
            module.bias.copy_((-mean * scale).reshape(-1).to(module.bias.dtype))
            return ((out - mean) * scale).to(out.dtype)
        return (out * scale).to(out.dtype)

    handles = [m.register_forward_hook(hook) for _, m in layers]
    try:
        model(*batch) if isinstance(batch, (tuple, list)) else model(batch)
    finally:
        for h in handles:
            h.remove()
    missed = [path for path, m in layers if id(m) not in done]
    if missed:
        raise ValueError(f"data_dependent_init: weight-normalized layers {missed} did not run on the batch")
    return model
