"""Online normalization: statistics streamed across samples instead of taken over the batch."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..functional.online import ECMS
from .base import Norm


class OnlineNorm(Norm):
    r"""Online normalization (Chiley et al., NeurIPS 2019, arXiv:1905.05894).

    Each sample of a batch is normalized, per channel, with the mean and variance streamed
    (exponential moving average, decay ``alpha_fwd``) over the samples before it, in batch
    order and across batches; the backward is the paper's control process (decay
    ``alpha_bkw``), a custom backward that is not the true gradient of the forward (so
    ``gradcheck`` does not apply). Then the affine map and the error compensation ``ecm``:
    ``"ls"`` layer scaling (default, as in the paper's experiments), ``"ac"`` activation
    clamping to +-``clamp_value``, or None. See :func:`normlab.functional.online_norm`.

    Works with any batch size, 1 included, and in dense ``(N, C)`` as well as ``(N, C, *)``
    layers (``channel_dim`` for other layouts). Eval normalizes with the streamed statistics
    and changes nothing.

    Buffers (all per channel, float, in the state_dict):
        ``stream_mean``: the streamed mean mu (init 0).
        ``stream_var``: the streamed variance sigma^2 (init 1).
        ``control_u``: the backward accumulator of the gradient's constant component (init 0).
        ``control_v``: the backward accumulator of the gradient's component along y (init 0).

    Defaults are the paper's ImageNet ones; its CIFAR-10 runs used ``alpha_fwd=1023/1024,
    alpha_bkw=127/128``, CIFAR-100 ``511/512, 15/16``.
    """

    def __init__(
        self,
        num_features: int,
        alpha_fwd: float = 0.999,
        alpha_bkw: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        ecm: str | None = "ls",
        channel_dim: int = 1,
        *,
        ls_eps: float = 1e-5,
        clamp_value: float = 5.0,
        check_finite: bool = False,
        device: Any = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(num_features, eps, affine, channel_dim, check_finite, device, dtype)
        name = type(self).__name__
        if not 0 < alpha_fwd <= 1:
            raise ValueError(f"{name}: alpha_fwd must be in (0, 1], got {alpha_fwd!r}")
        if not 0 <= alpha_bkw <= 1:
            raise ValueError(f"{name}: alpha_bkw must be in [0, 1], got {alpha_bkw!r}")
        if isinstance(ecm, str):
            ecm = ecm.lower()
        if ecm not in ECMS:
            raise ValueError(f"{name}: ecm must be 'ls' (layer scaling), 'ac' (activation clamping) or None, got {ecm!r}")
        if not ls_eps > 0:
            raise ValueError(f"{name}: ls_eps must be > 0, got {ls_eps!r}")
        if not clamp_value > 0:
            raise ValueError(f"{name}: clamp_value must be > 0, got {clamp_value!r}")
        self.alpha_fwd, self.alpha_bkw = alpha_fwd, alpha_bkw
        self.ecm, self.ls_eps, self.clamp_value = ecm, ls_eps, clamp_value
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("stream_mean", torch.zeros(num_features, **factory))
        self.register_buffer("stream_var", torch.ones(num_features, **factory))
        self.register_buffer("control_u", torch.zeros(num_features, **factory))
        self.register_buffer("control_v", torch.zeros(num_features, **factory))

    def reset_stream(self) -> None:
        """Forget the streamed statistics and the control state (mu=0, sigma^2=1, u=v=0)."""
        self.stream_mean.zero_()
        self.stream_var.fill_(1)
        self.control_u.zero_()
        self.control_v.zero_()

    def reset_parameters(self) -> None:
        self.reset_stream()
        if self.affine:
            torch.nn.init.ones_(self.weight)
            torch.nn.init.zeros_(self.bias)

    def forward(self, x: Tensor) -> Tensor:
        self.check_input(x)
        return F.online_norm(
            x,
            self.stream_mean,
            self.stream_var,
            self.control_u,
            self.control_v,
            self.weight,
            self.bias,
            training=self.training,
            alpha_fwd=self.alpha_fwd,
            alpha_bkw=self.alpha_bkw,
            eps=self.eps,
            ecm=self.ecm,
            ls_eps=self.ls_eps,
            clamp_value=self.clamp_value,
            channel_dim=self.channel_dim,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + f", alpha_fwd={self.alpha_fwd}, alpha_bkw={self.alpha_bkw}, ecm={self.ecm!r}"
