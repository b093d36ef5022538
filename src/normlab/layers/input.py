"""Input standardization: per-feature statistics of a whole data set, fitted once (or in a
stream of batches) and applied as a fixed affine map, with its inverse for predictions."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import Tensor, nn

from .. import _moments
from .._moments import Moments

__all__ = ["InputStandardizer"]

_MODES = ("standard", "minmax")


class InputStandardizer(nn.Module):
    r"""Standardize inputs with per-feature statistics of the training data.

    ``mode="standard"``: y = (x - mean) / std, the population (biased) std over every
    value of the data set but the feature axis ``dim``; ``mode="minmax"``: y = (x - min) /
    (max - min), onto [0, 1]. A scale below ``eps`` is replaced by ``eps`` (a constant
    feature). ``inverse(y)`` maps back to the original units (for predictions).

    ``fit(data)`` / ``partial_fit(batch)`` take a tensor or an iterable of batches (a tuple
    or list batch, as a DataLoader yields, contributes its first item). The moments are
    exact streaming moments in float64 (Chan's merge in ``normlab._moments``), so one
    ``fit`` over the concatenated data equals many ``partial_fit`` calls over its pieces.
    The fit lives in buffers (``count``, ``mean``, ``m2``, ``data_min``, ``data_max``), so
    it travels with the state_dict. The buffers stay float64 unless the module is cast.

    Args:
        num_features: the size of the feature axis.
        dim: the feature axis (1 for (N, C, ...), -1 for (N, L, C)).
        mode: "standard" or "minmax".
        eps: the smallest scale divided by.
    """

    def __init__(self, num_features: int, dim: int = 1, mode: str = "standard", eps: float = 1e-8,
                 device: Any = None) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(num_features, int) or isinstance(num_features, bool) or num_features <= 0:
            raise ValueError(f"{name}: num_features must be a positive int, got {num_features!r}")
        if mode not in _MODES:
            raise ValueError(f"{name}: mode must be one of {_MODES}, got {mode!r}")
        if not isinstance(dim, int) or dim == 0:
            raise ValueError(f"{name}: dim must be a non-zero int (axis 0 is the batch), got {dim!r}")
        if not eps > 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps!r}")
        self.num_features = num_features
        self.dim = dim
        self.mode = mode
        self.eps = eps
        f64 = {"dtype": torch.float64, "device": device}
        self.register_buffer("count", torch.zeros((), **f64))
        self.register_buffer("mean", torch.zeros(num_features, **f64))
        self.register_buffer("m2", torch.zeros(num_features, **f64))
        self.register_buffer("data_min", torch.full((num_features,), float("inf"), **f64))
        self.register_buffer("data_max", torch.full((num_features,), float("-inf"), **f64))

    # ------------------------------------------------------------------ fitting
    @property
    def fitted(self) -> bool:
        return bool(self.count > 0)

    @property
    def var(self) -> Tensor:
        """The population variance of each feature over the data fitted so far."""
        return self.m2 / self.count.clamp_min(1)

    @property
    def std(self) -> Tensor:
        return self.var.sqrt()

    def reset(self) -> "InputStandardizer":
        self.count.zero_()
        self.mean.zero_()
        self.m2.zero_()
        self.data_min.fill_(float("inf"))
        self.data_max.fill_(float("-inf"))
        return self

    def _who(self) -> str:
        return f"{type(self).__name__}({self.num_features}, dim={self.dim})"

    def _axis(self, x: Any) -> int:
        who = self._who()
        if not isinstance(x, Tensor):
            raise TypeError(f"{who}: expected a torch.Tensor batch, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{who}: expected a floating-point input, got dtype {x.dtype}")
        if x.ndim < 2 or not -x.ndim <= self.dim < x.ndim or self.dim % x.ndim == 0:
            raise ValueError(f"{who}: expected an input (N, ...) with feature axis {self.dim}, got shape {tuple(x.shape)}")
        axis = self.dim % x.ndim
        if x.shape[axis] != self.num_features:
            raise ValueError(f"{who}: expected {self.num_features} features along axis {axis}, got {x.shape[axis]} "
                             f"(input shape {tuple(x.shape)})")
        return axis

    @torch.no_grad()
    def partial_fit(self, data: Tensor | Iterable[Any]) -> "InputStandardizer":
        """Add a batch (or an iterable of batches) to the fit; returns self."""
        batches = [data] if isinstance(data, Tensor) else data
        # accumulate locally and commit at the end, so a bad batch changes nothing
        acc = Moments(self.count.clone(), self.mean.clone(), self.m2.clone())
        lo, hi = self.data_min.clone(), self.data_max.clone()
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            axis = self._axis(x)
            if x.numel() == 0:
                continue
            if not torch.isfinite(x).all():
                raise ValueError(f"{self._who()}: batch holds NaN or Inf values")
            dims = [d for d in range(x.ndim) if d != axis]
            xd = x.detach().to(device=self.mean.device, dtype=torch.float64)
            new = _moments.moments(xd, dims)
            acc = _moments.merge(acc, Moments(float(new.count), new.mean.reshape(-1), new.m2.reshape(-1)))
            lo = torch.minimum(lo, xd.amin(dims))
            hi = torch.maximum(hi, xd.amax(dims))
        self.count.copy_(acc.count)
        self.mean.copy_(acc.mean)
        self.m2.copy_(acc.m2)
        self.data_min.copy_(lo)
        self.data_max.copy_(hi)
        return self

    def fit(self, data: Tensor | Iterable[Any]) -> "InputStandardizer":
        """Fit from scratch on a tensor or an iterable of batches; returns self."""
        self.reset()
        self.partial_fit(data)
        if not self.fitted:
            raise ValueError(f"{self._who()}: fit() got no data")
        return self

    # ------------------------------------------------------------------ applying
    def _shift_scale(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.fitted:
            raise RuntimeError(f"{self._who()}: not fitted; call fit(data) or partial_fit(batch) first")
        axis = self._axis(x)
        if self.mode == "standard":
            shift, scale = self.mean, self.std
        else:
            shift, scale = self.data_min, self.data_max - self.data_min
        scale = scale.clamp_min(self.eps)
        shape = [1] * x.ndim
        shape[axis] = -1
        return shift.view(shape), scale.view(shape)

    def forward(self, x: Tensor) -> Tensor:
        shift, scale = self._shift_scale(x)
        return ((x - shift) / scale).to(x.dtype)

    def inverse(self, y: Tensor) -> Tensor:
        """Undo ``forward``: back to the original units."""
        shift, scale = self._shift_scale(y)
        return (y * scale + shift).to(y.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, dim={self.dim}, mode={self.mode!r}, eps={self.eps}, fitted={self.fitted}"
