"""Cross-Iteration Batch Normalization (Yao, Cao, Zheng, Huang & Lin, CVPR 2021,
arXiv:2002.05712): batch statistics pooled over the last k iterations, the older ones moved
to the current weights of the preceding layer by a first-order Taylor step."""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
from torch import Tensor

from .. import _moments
from .._layout import stat_dims
from ._common import normalize

__all__ = ["IterationStats", "iteration_stats", "cross_iteration_batch_norm"]


class IterationStats(NamedTuple):
    """What one iteration leaves for the next k-1: its per-channel mean mu and quadratic mean
    nu of the layer's output, their derivatives with respect to the preceding layer's weight
    (same shape as the weight; row c holds those of channel c), and that weight."""

    mu: Tensor
    nu: Tensor
    dmu_dw: Tensor
    dnu_dw: Tensor
    weight: Tensor


def _mu_nu(y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel E[y] and E[y^2] over the batch and positions (from the moments)."""
    m = _moments.moments(y, stat_dims(y.ndim, 1, "batch"))
    mu = m.mean.reshape(-1)
    return mu, m.var.reshape(-1) + mu * mu


def iteration_stats(conv: torch.nn.Module, x: Tensor) -> IterationStats:
    """mu, nu of ``conv(x)`` and their derivatives w.r.t. ``conv.weight`` (all detached).

    mu_c depends on filter c alone, so the gradient of sum_c mu_c holds every dmu_c/dW_c.
    The convolution is run once more on detached inputs, apart from the caller's graph.
    """
    w = conv.weight.detach().requires_grad_()
    bias = conv.bias.detach() if conv.bias is not None else None
    with torch.enable_grad():
        mu, nu = _mu_nu(conv._conv_forward(x.detach(), w, bias))
        dmu = torch.autograd.grad(mu.sum(), w, retain_graph=True)[0]
        dnu = torch.autograd.grad(nu.sum(), w)[0]
    return IterationStats(mu.detach(), nu.detach(), dmu, dnu, w.detach().clone())


def _compensated(past: IterationStats, weight: Tensor) -> tuple[Tensor, Tensor]:
    """Past mu, nu moved to ``weight`` by the first-order Taylor term, per channel."""
    delta = (weight - past.weight).reshape(weight.shape[0], -1)
    mu = past.mu + (past.dmu_dw.reshape(delta.shape) * delta).sum(1)
    nu = past.nu + (past.dnu_dw.reshape(delta.shape) * delta).sum(1)
    return mu, nu


def cross_iteration_batch_norm(
    y: Tensor,
    weight_now: Tensor,
    past: Sequence[IterationStats],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor, Tensor]:
    r"""Normalize ``y`` (the preceding layer's output, channels on axis 1) with statistics
    pooled over this iteration and the ``past`` ones (Yao et al., CVPR 2021, Eq. 6-9)::

        mu_{t-tau}(theta_t) ~ mu_{t-tau} + (d mu_{t-tau} / d theta_{t-tau}) . (theta_t - theta_{t-tau})
        nu_{t-tau}(theta_t) ~ nu_{t-tau} + (d nu_{t-tau} / d theta_{t-tau}) . (theta_t - theta_{t-tau})
        mu = mean_tau mu_{t-tau}        sigma2 = mean_tau max(nu_{t-tau}, mu_{t-tau}^2) - mu^2
        out = gamma_c * (y - mu) / sqrt(sigma2 + eps) + beta_c

    tau runs over 0 (this batch, whose statistics carry the gradient) and the past
    iterations (detached constants). With no ``past`` this is batch norm. Returns the output
    and this batch's own (mu, nu).
    """
    mu_t, nu_t = _mu_nu(y)
    mus, nus = [mu_t], [nu_t]
    w_now = weight_now.detach()
    for p in past:
        mu_p, nu_p = _compensated(p, w_now)
        mus.append(mu_p.to(mu_t.dtype))
        nus.append(nu_p.to(nu_t.dtype))
    mu_s, nu_s = torch.stack(mus), torch.stack(nus)
    mu = mu_s.mean(0)
    var = (torch.maximum(nu_s, mu_s * mu_s).mean(0) - mu * mu).clamp_min(0)
    shape = (1, -1) + (1,) * (y.ndim - 2)
    return normalize(y, mu.reshape(shape), var.reshape(shape), eps, weight, bias, 1), mu_t, nu_t
