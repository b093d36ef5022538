"""PowerNorm (Shen, Yao, Gholami, Mahoney & Keutzer, ICML 2020, arXiv:2003.07845): batch
norm for transformers without centring, normalized by a RUNNING quadratic mean, with the
paper's approximate backpropagation through that running statistic (Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import _moments, engine
from .._layout import channel_axis, per_channel, stat_dims
from ._common import affine
from .norm_act import activation

__all__ = ["power_norm"]


def _batch_quadratic_mean(x: Tensor, channel_dim: int) -> Tensor:
    """Per-channel mean of x^2 over every other axis, from the per-channel moments (a length-C vector)."""
    m = _moments.moments(x, stat_dims(x.ndim, channel_dim, "batch"))
    return (m.var + m.mean * m.mean).reshape(-1)


class _PowerNormTrain(torch.autograd.Function):
    """x_hat = x / psi_{t-1}; backward dx = (dx_hat - nu_{t-1} * x_hat) / psi_{t-1}, nu updated in place."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, running_phi: Tensor, ema_gz: Tensor, alpha_bkw: float, eps: float,
                cd: int) -> Tensor:
        inv_psi = per_channel(torch.rsqrt(running_phi + eps), x.ndim, cd).to(x.dtype)
        x_hat = x * inv_psi
        ctx.save_for_backward(x_hat, inv_psi)
        ctx.ema_gz, ctx.alpha, ctx.cd = ema_gz, alpha_bkw, cd
        return x_hat

    @staticmethod
    def backward(ctx: Any, dx_hat: Tensor) -> tuple[Tensor | None, ...]:
        x_hat, inv_psi = ctx.saved_tensors
        cd, nu = ctx.cd, ctx.ema_gz
        nu_b = per_channel(nu, x_hat.ndim, cd).to(x_hat.dtype)
        dx_tilde = dx_hat - nu_b * x_hat
        dims = stat_dims(x_hat.ndim, cd, "batch")
        with torch.no_grad():  # nu_t = nu_{t-1} (1 - (1 - alpha) Gamma) + (1 - alpha) Lambda
            gamma_t = (x_hat * x_hat).mean(dims).reshape(-1).to(nu.dtype)
            lambda_t = (x_hat * dx_hat).mean(dims).reshape(-1).to(nu.dtype)
            nu.mul_(1 - (1 - ctx.alpha) * gamma_t).add_((1 - ctx.alpha) * lambda_t)
        return dx_tilde * inv_psi, None, None, None, None, None


def power_norm(
    x: Tensor,
    running_phi: Tensor,
    ema_gz: Tensor | None = None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    training: bool = True,
    alpha_fwd: float = 0.9,
    alpha_bkw: float = 0.9,
    eps: float = 1e-5,
    channel_dim: int = 1,
    act: str | None = None,
    negative_slope: float = 0.01,
) -> Tensor:
    r"""PowerNorm (Shen et al., ICML 2020, arXiv:2003.07845), Algorithm 1.

    Per channel c, no centring, divided by the running quadratic mean psi of EARLIER
    iterations (``running_phi`` holds psi^2, init 1)::

        x_hat = x / sqrt(psi2_{t-1} + eps)           y = gamma_c * x_hat + beta_c
        psi2_t = alpha_fwd * psi2_{t-1} + (1 - alpha_fwd) * mean over the batch of x^2

    Backward (the paper's approximate backpropagation of the running statistic), with
    ``ema_gz`` holding nu (init 0), updated in place during backward::

        dx_tilde = dL/dx_hat - nu_{t-1} * x_hat       dL/dx = dx_tilde / sqrt(psi2_{t-1} + eps)
        nu_t = nu_{t-1} (1 - (1 - alpha_bkw) mean(x_hat^2)) + (1 - alpha_bkw) mean(x_hat * dL/dx_hat)

    In eval ``y = gamma_c * x / sqrt(psi2_T + eps) + beta_c``, buffers unchanged. The
    official code's warm-up on batch statistics and its GroupScaling pre-step are not part
    of Algorithm 1 and are not applied here. Large inputs run on the engine
    (:class:`normlab.engine.PowerStats`, the same backward in closed form, x saved); the
    Function here is its reference. ``act`` (relu, leaky_relu with ``negative_slope``, silu,
    gelu) applies an activation to the output, fused into the engine's output pass where the
    engine runs: ``act(power_norm(x))``.
    """
    cd = channel_axis(x.ndim, channel_dim)
    if training and ema_gz is None:
        raise ValueError("power_norm: training needs the ema_gz buffer (the backward statistic nu)")
    if engine.route("pn", x, cd, 1, engine.dtypes_of(running_phi, ema_gz, weight, bias)) == "kernels":
        fused = engine.epilogue(act, negative_slope)
        if not training:  # batch norm's eval map with centre 0 and variance psi2
            y = engine.affine_eval(x, cd, torch.zeros_like(running_phi), running_phi, eps, weight, bias, fused)
            if y is not None:
                return y
        else:  # the engine: x and (N, C) statistics saved, nu updated by the description's adjoint
            desc = engine.PowerStats(eps, running_phi, ema_gz, alpha_bkw)

            def reference(x: Tensor, w: Tensor | None, b: Tensor | None) -> Tensor:  # (double backward)
                desc.nu_updated = True  # by this reference's own backward
                return power_norm(x, desc.phi_prev.to(running_phi.dtype), ema_gz, w, b, alpha_fwd=alpha_fwd,
                                  alpha_bkw=alpha_bkw, eps=eps, channel_dim=cd)

            desc.reference = reference
            y = engine.run(desc, x, cd, (weight, bias), fused)
            with torch.no_grad():
                running_phi.lerp_(desc.quadratic_mean.reshape(-1).to(running_phi.dtype), 1 - alpha_fwd)
            return y
    if not training:
        x_hat = x * per_channel(torch.rsqrt(running_phi + eps), x.ndim, cd).to(x.dtype)
        return activation(affine(x_hat, weight, bias, cd).to(x.dtype), act, negative_slope)
    x_hat = _PowerNormTrain.apply(x, running_phi, ema_gz, alpha_bkw, eps, cd)
    with torch.no_grad():
        running_phi.lerp_(_batch_quadratic_mean(x.detach(), cd).to(running_phi.dtype), 1 - alpha_fwd)
    return activation(affine(x_hat, weight, bias, cd).to(x.dtype), act, negative_slope)
