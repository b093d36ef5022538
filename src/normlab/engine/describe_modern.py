"""The norms since 2020 that are per-(n, c) moment norms, as descriptions for the engine
(the conventions of :mod:`.describe`: per-(n, c) moments in, ``(center, scale, shift)`` out,
the closed-form adjoint from ``g = sum dy`` and ``h = sum dy (x - center)``)."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _kernels, _moments
from .._kernels import evonorm as _evonorm
from .._moments import Moments
from .describe import Description, _out, _row

__all__ = ["EvoB0Stats", "EvoS0Stats", "PowerStats"]


class PowerStats(Description):
    """PowerNorm (Shen et al., ICML 2020, Algorithm 1): per channel, no centre, divided by the
    running quadratic mean of EARLIER batches, ``psi = sqrt(psi2_{t-1} + eps)`` (``running_phi``
    holds psi2): ``y = w x / psi + b``, an affine map per channel whose scale does not depend on
    this batch. The merge only feeds the running update: the batch's quadratic mean per channel
    ``mean(x^2) = var + mean^2`` of the moments merged over the batch (``quadratic_mean``, (1, C)).

    Backward is the paper's approximation, not the derivative of the map: with
    ``dL/dx_hat = w dy``, over the batch's ``NK`` values per channel (``h = sum dy x``, centre 0)::

        Lambda = mean(x_hat w dy) = w sum_n h / (psi NK)      Gamma = mean(x_hat^2) = quadratic_mean / psi^2
        dx = (w dy - nu_{t-1} x_hat) / psi  =  (w / psi) dy - (nu_{t-1} / psi^2) x
        nu_t = nu_{t-1} (1 - (1 - alpha_bkw) Gamma) + (1 - alpha_bkw) Lambda    (``ema_gz``, in place)
        dweight = sum_n h / psi        dbias = sum_n g

    ``nu`` is updated where the input's gradient is computed (:meth:`input_grad`), as the plain
    path's Function does (no input gradient asked: no update), once per forward call (a second
    pass through the same call, e.g. a gradient penalty's, leaves it; the double-backward
    reference sets ``nu_updated`` when its own backward updates it)."""

    nu_updated = False

    center = False

    def __init__(self, eps: float, running_phi: Tensor, ema_gz: Tensor, alpha_bkw: float) -> None:
        self.eps, self.phi, self.nu, self.alpha = eps, running_phi, ema_gz, alpha_bkw

    def coefficients(self, mean, m2, count, weight=None, bias=None):
        n, c = mean.shape
        self.phi_prev = self.phi.detach().to(torch.float64, copy=True)  # psi2_{t-1} (the buffer moves on)
        self.inv_psi = torch.rsqrt(self.phi_prev.reshape(1, c) + self.eps)
        m = _moments.reduce_moments(Moments(count, mean, m2), 0)
        self.quadratic_mean = (m.var + m.mean * m.mean).reshape(1, c)
        self.w, self.values = _row(weight, c, 1.0), float(m.count)
        return torch.zeros(1, c, dtype=torch.float64), self.w * self.inv_psi, _row(bias, c, 0.0)

    def input_grad(self, g, h, weight=None, bias=None):
        nu = self.nu.detach().to(torch.float64).reshape(1, -1)
        a, b = self.w * self.inv_psi, -nu * self.inv_psi ** 2
        if self.nu_updated:
            return a, b, torch.zeros_like(a)
        self.nu_updated = True
        with torch.no_grad():
            big_gamma = (self.quadratic_mean * self.inv_psi ** 2).reshape(-1).to(self.nu.dtype)
            big_lambda = (self.w * h.sum(0, keepdim=True) * self.inv_psi / self.values).reshape(-1).to(self.nu.dtype)
            self.nu.mul_(1 - (1 - self.alpha) * big_gamma).add_((1 - self.alpha) * big_lambda)
        return a, b, torch.zeros_like(a)

    def param_grads(self, g, h, need, weight=None, bias=None):
        dw = _out(h.sum(0) * self.inv_psi.reshape(-1), weight) if need[0] else None
        db = _out(g.sum(0), bias) if need[1] else None
        return dw, db


class _ElementMapStats(Description):
    """EvoNorm's descriptions: not an affine map of x, so they run their own passes
    (``elementwise``): :meth:`forward` and ``backward`` (kernels in ``_kernels/evonorm_impl.h``)."""

    elementwise = True

    def forward(self, x: Tensor, y: Tensor, layout: str, count: int, params: tuple, fused: bool = False
                ) -> tuple[Tensor, Tensor]:
        """``y`` from ``x`` (kernel views, ``count`` values per (n, c)): the moments, the merge
        (:meth:`coefficients`), the output pass; returns the per-(n, c) mean and M2. ``fused``:
        the engine's choice of the per-sample passes from cache, where a norm has them."""
        mean, m2 = _kernels.moments(x, layout)
        self.output(x, y, layout, *self.coefficients(mean, m2, count, *params))
        return mean, m2


class EvoS0Stats(_ElementMapStats):
    """EvoNorm-S0 (Liu et al., NeurIPS 2020): ``y = f(x) r gamma + beta`` with ``f(x) = x
    sigmoid(v x)`` and ``r = 1 / sqrt(var_g + eps)`` over the sample's group of C/G channels
    (the merge of group norm, :func:`normlab._moments.group_moments`). Not an affine map of x,
    so it runs its own element map (``elementwise``; kernels in ``_kernels/evonorm_impl.h``):
    coefficients ``(mu_g, gamma r, beta)``, output ``f(x) * scale + shift``; with ``fused`` (the
    engine's rule for per-sample norms) both passes run per sample from cache, statistics
    included (``_kernels/evos0_impl.h``).

    Adjoint. With ``s = sigmoid(v x)``, ``f'(x) = s + v x s (1 - s)``, ``df/dv = x^2 s (1 - s)``,
    the per-(n, c) sums of one backward read ``F = sum dy f(x)``, ``Q = sum dy x^2 s (1 - s)``,
    ``g = sum dy``, ``A_ng = sum_{c in g} gamma_c F_nc`` (the gradient of r) and ``K`` values a
    group; ``dr/dvar = -r^3 / 2`` and ``dvar/dx = 2 (x - mu_g) / K``, so::

        dx = gamma r f'(x) dy - (r^3 A / K) (x - mu_g)
        dgamma = sum_n r F        dbeta = sum_n g        dv = gamma sum_n r Q
    """

    fused = False

    def __init__(self, groups: int, eps: float) -> None:
        self.groups, self.eps = groups, eps

    def forward(self, x: Tensor, y: Tensor, layout: str, count: int, params: tuple, fused: bool = False
                ) -> tuple[Tensor, Tensor]:
        if not fused:
            return super().forward(x, y, layout, count, params)
        weight, bias, v = params
        mean, m2, self.ctr, self.rstd = _evonorm.evos0_forward(x, y, layout, self.groups, self.eps, v, weight, bias)
        self.fused, self.count, self.w, self.v = True, count, _row(weight, mean.shape[1], 1.0), v
        return mean, m2

    def coefficients(self, mean, m2, count, weight=None, bias=None, v=None):
        c = mean.shape[1]
        self.ctr, var = _moments.group_moments(mean, m2, count, self.groups, True)
        self.rstd, self.count, self.w, self.v = torch.rsqrt(var + self.eps), count, _row(weight, c, 1.0), v
        return self.ctr, self.w * self.rstd, _row(bias, c, 0.0)

    def output(self, x: Tensor, y: Tensor, layout: str, center: Tensor, scale: Tensor, shift: Tensor) -> None:
        _evonorm.evonorm_forward("s0", x, y, layout, self.v, None, None, scale, shift)

    def backward(self, dy: Tensor, x: Tensor, dx: Tensor | None, layout: str, need: tuple[bool, ...],
                 weight: Tensor | None = None, bias: Tensor | None = None, v: Tensor | None = None) -> tuple:
        """The input gradient into ``dx`` (None: not asked) and the parameters' gradients."""
        if self.fused and dx is not None:
            big_f, g, q = _evonorm.evos0_backward(dy, x, dx, layout, self.groups, v, weight, self.ctr, self.rstd)
        else:
            big_f, g, q = _evonorm.evonorm_reduce("s0", dy, x, layout, v, None, None, keep=dx)[:3]
        if dx is not None and not self.fused:
            n, c = g.shape
            per = c // self.groups
            big_a = (self.w * big_f).view(n, self.groups, per).sum(2, keepdim=True).expand(n, self.groups, per)
            b = -self.rstd ** 3 * big_a.reshape(n, c) / (self.count * per)
            _evonorm.evonorm_dx("s0", dy, x, dx, layout, v, None, None, self.w * self.rstd, b, self.ctr, None,
                                kept=True)
        dw = _out((self.rstd * big_f).sum(0), weight) if need[0] else None
        db = _out(g.sum(0), bias) if need[1] else None
        dv = _out((self.w * self.rstd * q).sum(0), v) if need[2] else None
        return dw, db, dv


class EvoB0Stats(_ElementMapStats):
    """EvoNorm-B0 (Liu et al., NeurIPS 2020): ``y = gamma x u + beta``, ``u = 1 / max(D, v x + E)``
    with ``D = sqrt(var_b + eps)`` per channel (the per-(n, c) moments merged over the batch, as
    batch norm; or the running variance, a constant: ``running_var``) and ``E = sqrt(var_i + eps)``
    per (n, c) (the moments as they are). Not an affine map of x: its own element map
    (``elementwise``; kernels in ``_kernels/evonorm_impl.h``).

    Adjoint. Left where ``D >= v x + E`` (there ``dy/dx = gamma / D`` and ``dy/dD = -gamma x u^2``),
    right elsewhere (``dy/dx = gamma E u^2``, ``dy/dE = -gamma x u^2``, ``dy/dv = -gamma x^2 u^2``).
    With the per-(n, c) sums ``P = sum dy x u``, ``g = sum dy``, ``S_L = sum_left dy x u^2``,
    ``S_R = sum_right dy x u^2``, ``S_V = sum_right dy x^2 u^2``, ``K`` positions and ``N``
    samples, ``dD/dx = (x - mu_b) / (D N K)`` and ``dE/dx = (x - mu_i) / (E K)``::

        dx = gamma dy (left: u; right: E u^2) + b_B (x - mu_b) + b_I (x - mu_i)
        b_B = -gamma sum_n S_L / (D N K)   (0 with the running variance)     b_I = -gamma S_R / (E K)
        dgamma = sum_n P        dbeta = sum_n g        dv = -gamma sum_n S_V

    The input-gradient pass is centred on ``mu_i``: ``b = b_B + b_I``, ``k = b_B (mu_i - mu_b)``.
    ``batch_moments`` (batch statistics) holds the merged moments for the running update."""

    def __init__(self, eps: float, running_var: Tensor | None) -> None:
        self.eps, self.running_var = eps, running_var

    def coefficients(self, mean, m2, count, weight=None, bias=None, v=None):
        c = mean.shape[1]
        self.e_std = torch.sqrt(m2 / count + self.eps)
        if self.running_var is None:
            self.batch_moments = _moments.reduce_moments(Moments(count, mean, m2), 0)
            self.mu_b = self.batch_moments.mean.reshape(1, c)
            var_b = self.batch_moments.var.reshape(1, c)
        else:
            var_b = self.running_var.detach().to(torch.float64).reshape(1, c)
        self.d_std = torch.sqrt(var_b + self.eps)
        self.mu_i, self.count, self.w, self.v = mean, count, _row(weight, c, 1.0), v
        return mean, self.w, _row(bias, c, 0.0)

    def output(self, x: Tensor, y: Tensor, layout: str, center: Tensor, scale: Tensor, shift: Tensor) -> None:
        _evonorm.evonorm_forward("b0", x, y, layout, self.v, self.d_std, self.e_std, scale, shift)

    def backward(self, dy: Tensor, x: Tensor, dx: Tensor | None, layout: str, need: tuple[bool, ...],
                 weight: Tensor | None = None, bias: Tensor | None = None, v: Tensor | None = None) -> tuple:
        """The input gradient into ``dx`` (None: not asked) and the parameters' gradients."""
        # dy slope(x) is kept between the passes (as S0 does) only for channels-last bfloat16 on AVX-512: the
        # slope, one division, costs less than writing and reading it back elsewhere (measured two threads,
        # (32, 64, 56, 56), both passes kept / not: AVX-512, bfloat16 channels-last 0.85-0.97 (the layer's step
        # 0.85-0.92), channel-first 1.11-1.12; float16 channels-last, the layer 1.03; float32 channels-last
        # 0.97-1.10, channel-first 1.16). On AVX2 (Zen 3), bfloat16 channels-last, the layer's step not kept /
        # kept 0.89, 0.95, 1.01, 0.97, 0.97 in five paired runs (40-60 rounds), 0.99 at (32, 64, 28, 28): the
        # bfloat16 rounding store of the kept value costs what the division saves. Not kept, the input
        # gradient also skips that rounding (0.03 apart here at most, values of order 1).
        keep = dx if dx is not None and layout == "cl" and x.dtype == torch.bfloat16 and _kernels.wide_vectors() else None
        p, g, s_l, s_r, s_v = _evonorm.evonorm_reduce("b0", dy, x, layout, v, self.d_std, self.e_std,
                                                      keep=keep).unbind(0)
        if dx is not None:
            n = g.shape[0]
            b_i = -self.w * s_r / (self.e_std * self.count)
            if self.running_var is None:
                b_b = -self.w * s_l.sum(0, keepdim=True) / (self.d_std * n * self.count)
                b, k = b_b + b_i, b_b * (self.mu_i - self.mu_b)
            else:
                b, k = b_i, torch.zeros_like(b_i)
            _evonorm.evonorm_dx("b0", dy, x, dx, layout, v, self.d_std, self.e_std, self.w, b, self.mu_i, k,
                                kept=keep is not None)
        dw = _out(p.sum(0), weight) if need[0] else None
        db = _out(g.sum(0), bias) if need[1] else None
        dv = _out(-self.w.reshape(-1) * s_v.sum(0), v) if need[2] else None
        return dw, db, dv
