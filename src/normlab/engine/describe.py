"""The statistics norms as descriptions for the engine.

Every norm here is, per (sample n, channel c), the affine map ``y = (x - center) * scale +
shift`` whose (N, C) coefficients come from per-(n, c) moments of ``x`` (count K, mean, M2)
and the layer's parameters. A description says how:

``coefficients(mean, m2, count, *params)``
    the merge of the per-(n, c) moments into the norm's statistics (in :mod:`normlab._moments`,
    the one place that merges; synchronization across processes is one step of it) and the
    coefficients ``(center, scale, shift)``, float64, broadcastable to (N, C).
``input_grad(g, h, *params)``
    the closed-form adjoint: from the per-(n, c) sums ``g = sum dy`` and
    ``h = sum dy (x - center)`` the coefficients ``(a, b, k)`` of
    ``dx = a * dy + b * (x - center) + k``.
``param_grads(g, h, need, *params)``
    the parameters' gradients from the same sums.

With ``var = M2 / K`` and gradients ``G_mu``, ``G_var`` of the loss with respect to a
per-(n, c) mean and variance, ``d mean / dx = 1 / K`` and ``d var / dx = 2 (x - mean) / K``;
every adjoint below is that chain rule through its merge, written out. Running statistics
are updated by the caller from the moments a description keeps (``batch_moments``).
A description is made per call (it holds the call's settings and what its backward needs).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .. import _moments
from .._moments import Moments

__all__ = ["BatchStats", "BatchInstanceStats", "Description", "GlobalResponseStats", "GroupStats", "SwitchableStats"]


# (The descriptions run inside the engine's autograd Function, where no graph is recorded: the
# helpers below skip detach() and no-op reshapes and conversions. Each small operation counts:
# between two passes over a large input the caches hold none of the interpreter's and torch's
# dispatch state, and the (N, C) math of a description cost 10-17 us an operation there, 1.2-2 ms
# of a (32, 64, 56, 56) float32 step of brn, bin, sn, on, evob0: 20-27% of it.)
def _row(t: Tensor | None, c: int, fill: float) -> Tensor:
    """A length-C parameter as a float64 (1, C) row (``fill`` where absent)."""
    if t is None:
        return torch.full((1, c), fill, dtype=torch.float64)
    return t.reshape(1, c).to(torch.float64)


def _out(t: Tensor, like: Tensor | None) -> Tensor | None:
    """``t`` in the shape and dtype of the parameter ``like`` (its gradient; None without one)."""
    return None if like is None else _moments.shaped_like(t, like)


class Description:
    """Base of the descriptions; ``reference(x, *params)`` is the norm's plain function (a double
    backward differentiates it), ``groups`` the per-sample groups of the fused per-sample passes
    (None: the norm has none)."""

    groups: int | None = None
    center: bool = True
    needs_input: bool = True  # False: the adjoint never reads x (b = 0), so x is not saved
    reference: Callable[..., Tensor] | None = None
    moments_given: tuple[Tensor, Tensor] | None = None  # per-(n, c) (mean, M2) already computed
    elementwise = False  # True: not the affine map; the description's forward() and backward() run the passes
    # True: the engine leaves the per-(n, c) moments on the description after the forward
    # (mean_nc, m2_nc, count_nc), for a caller that reads them (instance norm tracking running
    # statistics sets it). Otherwise not kept: the description rides on the autograd context,
    # and (N, C) float64 arrays kept from forward to backward between a model's activations leave
    # holes in glibc's heap, which then grows and is trimmed: kept, the bench's float32 resnet
    # (bn on the kernels at 1M values a layer and more) took 1.03-1.06x torch's step with 8-24k page
    # faults a step, not kept 0.97-1.00x with 6-18k (batch 32 and 64, one process, alternating)
    keeps_moments = False
    # True: statistics per position over the channel axis alone, the input's channels innermost in
    # memory (contiguous with them last, or channels-last; the transformer's layer and RMS norm):
    # the engine runs the row passes on it as it is, in its layout (an (M, 1, C) view made outside
    # the Function would compute the same, but its view nodes cost ~10 us a call)
    per_position = False

    def coefficients(self, mean: Tensor, m2: Tensor, count: int, *params: Tensor | None
                     ) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def input_grad(self, g: Tensor, h: Tensor, *params: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        raise NotImplementedError

    def param_grads(self, g: Tensor, h: Tensor, need: tuple[bool, ...], *params: Tensor | None) -> tuple:
        raise NotImplementedError


class BatchStats(Description):
    """Batch norm (Ioffe & Szegedy 2015) and mean-only batch norm (Salimans & Kingma 2016):
    per channel, over the batch and every position. Merge: the exact merge over samples,
    then (``process_group``) over processes. Forward ``y = w rstd (x - mu) + b`` (mean-only:
    ``x - mu + b``). Adjoint, with ``g``, ``h`` summed over the batch (and all-reduced)::

        G_mu = -w rstd g        G_M2 = -w rstd^3 h / (2 count)      (mean-only: rstd = 1, G_M2 = 0)
        dx = w rstd dy + 2 G_M2 (x - mu) + G_mu / count
        dweight = rstd h        dbias = g                           (local sums: DDP averages)

    Batch renorm (Ioffe 2017) is this with weight ``w r`` and bias ``w d + b``, ``renorm = (r, d)``
    constants (float64 (C,), set by its caller once the batch is merged): then
    ``dweight = r rstd h + d g`` (no autograd graph on the (C,) parameters)."""

    renorm: tuple[Tensor, Tensor] | None = None

    def __init__(self, eps: float, mean_only: bool = False, process_group=None,
                 stat_shape: tuple[int, ...] | None = None) -> None:
        self.eps, self.mean_only, self.group, self.stat_shape = eps, mean_only, process_group, stat_shape
        self.needs_input = not mean_only  # mean-only: dx = dy - mean_c(dy) + 0 * x

    def merge(self, mean: Tensor, m2: Tensor, count: int, dtype: torch.dtype) -> Moments:
        """The batch's per-channel moments (C,), over every process of the group (kept as
        ``batch_moments``; a caller that merges first, as batch renorm does, sets
        ``moments_given`` so that the engine does not merge, or synchronize, twice)."""
        m = _moments.reduce_moments(Moments(count, mean, m2), 0)
        m = Moments(m.count, m.mean.reshape(-1), m.m2.reshape(-1))
        if self.group is not None:
            from .. import distributed

            acc = _moments.accumulation_dtype(dtype)
            shape = self.stat_shape or (-1,)
            s = distributed.all_reduce_moments(Moments(m.count, m.mean.to(acc).reshape(shape),
                                                       m.m2.to(acc).reshape(shape)), self.group)
            total = s.count.reshape(-1)[0].item() if isinstance(s.count, Tensor) else s.count
            m = Moments(total, s.mean.reshape(-1).double(), s.m2.reshape(-1).double())
        self.batch_moments = m
        return m

    def coefficients(self, mean, m2, count, weight=None, bias=None):
        m = self.batch_moments if self.moments_given is not None else self.merge(mean, m2, count, self.dtype)
        self.keep(m, weight)
        c = m.mean.numel()
        shift = _row(bias, c, 0.0)
        if self.renorm is not None:  # weight w r, bias w d + b
            r, d = self.renorm
            shift = shift + self.w * d.reshape(1, c)
            self.w = self.w * r.reshape(1, c)
            self.scale = self.w * self.rstd
        return m.mean.reshape(1, c), self.scale, shift

    def keep(self, m: Moments, weight: Tensor | None) -> None:
        """What the backward needs from the batch's per-channel moments ``m`` (kept as
        ``batch_moments``; from :meth:`merge`, or from the fused per-channel forward pass)."""
        if self.mean_only and weight is not None:
            raise ValueError("mean-only batch norm has no weight (its backward does not keep x)")
        c = m.mean.numel()
        self.batch_moments, self.count = m, float(m.count)
        self.rstd = torch.ones(1, c, dtype=torch.float64) if self.mean_only else \
            torch.rsqrt(m.var.reshape(1, c) + self.eps)
        self.w = _row(weight, c, 1.0)
        self.scale = self.w * self.rstd

    def affine_coefficients(self, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The output pass's per-channel centre, scale and shift, (1, C), from what :meth:`keep` holds."""
        c = self.rstd.shape[1]
        return self.batch_moments.mean.reshape(1, c), self.scale, _row(bias, c, 0.0)

    def _sums(self, g: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        """g and h summed over the batch, (1, C) (kept: the input's and the parameters' gradients both read them)."""
        if getattr(self, "sums_of", None) is not g:  # (the per-channel passes give them (1, C) already)
            sums = (g, h) if g.shape[0] == 1 else (g.sum(0, keepdim=True), h.sum(0, keepdim=True))
            self.sums, self.sums_of = sums, g
        return self.sums

    def input_grad(self, g, h, weight=None, bias=None):
        g, h = self._sums(g, h)
        a = self.scale  # w rstd (mean-only: rstd = 1)
        if self.group is None:  # the same, in fewer (N, C)-sized operations: b = 2 G_M2, k = G_mu / count
            b = torch.zeros_like(h) if self.mean_only else (a * self.rstd).mul_(self.rstd).mul_(h).mul_(-1.0 / self.count)
            return a, b, (a * g).mul_(-1.0 / self.count)
        g_mu = (a * g).neg_()
        g_m2 = torch.zeros_like(h) if self.mean_only else (a * self.rstd * self.rstd * h).mul_(-0.5 / self.count)
        if self.group is not None:
            from ..distributed import all_reduce_moment_grads

            g_mu, g_m2 = (t.reshape(1, -1) for t in all_reduce_moment_grads(g_mu, g_m2, self.group, self.stat_shape,
                                                                             self.dtype))
        return a, g_m2 * 2.0, g_mu / self.count

    def param_grads(self, g, h, need, weight=None, bias=None):
        g_c, h_c = (t.reshape(-1) for t in self._sums(g, h))
        if need[0]:
            dw = h_c * self.rstd.reshape(-1)
            if self.renorm is not None:
                dw = self.renorm[0] * dw + self.renorm[1] * g_c
        dw = _out(dw, weight) if need[0] else None
        db = _out(g_c, bias) if need[1] else None
        return dw, db


class GroupStats(Description):
    """Group norm (Wu & He 2018; one group: layer norm, Ba et al. 2016 as in the group-norm
    paper; C groups: instance norm, Ulyanov et al. 2016) and, ``center=False``, RMS norm (Zhang
    & Sennrich 2019): per sample and group of C/G consecutive channels. Merge: the exact merge
    over the group's channels (RMS: the mean square). With ``K`` values a group and
    ``A = sum_group w g``, ``B = sum_group w h``::

        dx = w rstd dy - rstd^3 B / K (x - mu) - rstd A / K        (RMS: no A term, mu = 0)
        dweight = sum_n rstd h        dbias = sum_n g

    The engine runs these with both passes fused per (sample, group) from cache when the
    input has enough such items (:func:`normlab._kernels.group_forward`)."""

    def __init__(self, groups: int, eps: float, center: bool = True) -> None:
        self.groups, self.eps, self.center = groups, eps, center

    def coefficients(self, mean, m2, count, weight=None, bias=None):
        ctr, var = _moments.group_moments(mean, m2, count, self.groups, self.center)
        self.keep(ctr, torch.rsqrt(var + self.eps), count, weight)
        return self.affine_coefficients(bias)

    def affine_coefficients(self, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """The output pass's per-(n, c) centre, scale and shift, from what :meth:`keep` holds."""
        return self.ctr, self.w * self.rstd, _row(bias, self.rstd.shape[1], 0.0)

    def keep(self, ctr: Tensor, rstd: Tensor, count: int, weight: Tensor | None) -> None:
        """What the backward needs (also given by the fused forward pass)."""
        self.ctr, self.rstd, self.count = ctr, rstd, count
        self.w = _row(weight, rstd.shape[1], 1.0)

    def input_grad(self, g, h, weight=None, bias=None):
        n, c = g.shape
        k = self.count * (c // self.groups)  # values per group

        def group_sum(t: Tensor) -> Tensor:
            return t.view(n, self.groups, -1).sum(2, keepdim=True).expand(n, self.groups, c // self.groups).reshape(n, c)

        big_b = group_sum(h * self.w)
        const = -self.rstd * group_sum(g * self.w) / k if self.center else torch.zeros_like(self.rstd)
        return self.w * self.rstd, -self.rstd ** 3 * big_b / k, const

    def param_grads(self, g, h, need, weight=None, bias=None):
        dw = _out((self.rstd * h).sum(0), weight) if need[0] else None
        if len(need) == 1:  # RMS norm: no bias
            return (dw,)
        return dw, _out(g.sum(0), bias) if need[1] else None


def _mix(weights: list[float], stats: list[Tensor]) -> Tensor:
    """sum_k weights[k] stats[k], the statistics broadcast to one (N, C) tensor."""
    out = torch.add(stats[0] * weights[0], stats[1], alpha=weights[1])
    for w, s in zip(weights[2:], stats[2:]):
        out.add_(s, alpha=w)
    return out


def _softmax(t: Tensor, k: int) -> list[float]:
    """The softmax of the last ``k`` values of ``t`` as Python numbers (a handful of values: no
    tensor operations, each of which costs 10 us or more between the passes)."""
    v = t.tolist()[-k:]
    top = max(v)
    e = [math.exp(a - top) for a in v]
    total = math.fsum(e)
    return [a / total for a in e]


class SwitchableStats(Description):
    """Switchable norm (Luo et al., ICLR 2019): per (n, c) a softmax-weighted mix of the instance,
    layer and batch moments (or the running ones), ``mu = sum_k a_k mu_k``, ``var = sum_k b_k
    var_k``, then ``y = w (x - mu) rstd + b``. Adjoint, with ``G_mu = -w rstd g`` and
    ``G_var = -w rstd^3 h / 2`` per (n, c), each statistic k receiving ``a_k G_mu`` and
    ``b_k G_var`` summed over the values that share it (K_k of them)::

        dx = w rstd dy + sum_k [ a_k G_mu,k / K_k + 2 b_k G_var,k (x - mu_k) / K_k ]
        dL/da_k = sum G_mu mu_k,  dL/db_k = sum G_var var_k  (then the softmax's Jacobian)

    An input without positions mixes the layer and batch moments only. ``fixed``: the running
    (mean, var) as float64 (1, C) rows, constants, or None for the batch's."""

    def __init__(self, eps: float, fixed: tuple[Tensor, Tensor] | None, positions: bool) -> None:
        self.eps, self.fixed, self.positions = eps, fixed, positions

    def coefficients(self, mean, m2, count, mean_weight, var_weight, weight=None, bias=None):
        n, c = mean.shape
        ln = _moments.reduce_moments(Moments(count, mean, m2), 1)
        # each statistic k: its mean, its M2 (or variance) and the factor that makes that its
        # variance, how many values share it (K_k; None: the running statistics, constants), and
        # the axis of (N, C) it spans (sums of the (N, C) gradients to its shape)
        stats = [(ln.mean, ln.m2, 1.0 / max(count * c, 1), count * c, 1)]
        if self.fixed is None:
            self.batch_moments = bn = _moments.reduce_moments(Moments(count, mean, m2), 0)
            stats.append((bn.mean, bn.m2, 1.0 / max(count * n, 1), count * n, 0))
        else:
            stats.append((self.fixed[0], self.fixed[1], 1.0, None, 0))
        if self.positions:
            stats.insert(0, (mean, m2, 1.0 / max(count, 1), count, None))
        k = len(stats)
        self.wm, self.wv = _softmax(mean_weight, k), _softmax(var_weight, k)
        # each mixture a weighted sum with Python-number weights, broadcast to (N, C): fewer
        # operations than stacking the statistics and contracting
        mu = _mix(self.wm, [s[0] for s in stats])
        self.rstd = _mix([w * s[2] for w, s in zip(self.wv, stats)], [s[1] for s in stats]).add_(self.eps).rsqrt_()
        self.w, self.stats, self.mu = _row(weight, c, 1.0), stats, mu
        self.scale = self.w * self.rstd
        return mu, self.scale, _row(bias, c, 0.0)

    def input_grad(self, g, h, *params):
        a = self.scale
        # A = -G_mu and V = -2 G_var per (n, c), and summed to each statistic's shape (kept: the
        # mixing weights' gradients read them)
        big_a, big_v = a * g, (a * self.rstd).mul_(self.rstd).mul_(h)
        self.sums = [(big_a, big_v) if dim is None else (big_a.sum(dim, keepdim=True), big_v.sum(dim, keepdim=True))
                     for *_, dim in self.stats]
        b_coef = k_coef = None
        for (m_k, _s, _f, n_k, _d), (a_k, v_k), wm, wv in zip(self.stats, self.sums, self.wm, self.wv):
            if n_k is None:  # running statistics: constants
                continue
            # b += 2 b_k G_var,k / K_k;  k += a_k G_mu,k / K_k + 2 b_k G_var,k (mu - mu_k) / K_k
            p_k = v_k * (-wv / n_k)
            b_coef = p_k if b_coef is None else b_coef + p_k
            k_coef = a_k * (-wm / n_k) if k_coef is None else torch.add(k_coef, a_k, alpha=-wm / n_k)
            k_coef = torch.addcmul(k_coef, p_k, self.mu - m_k)
        return a, b_coef, k_coef

    def param_grads(self, g, h, need, mean_weight, var_weight, weight=None, bias=None):
        if not hasattr(self, "sums"):
            self.input_grad(g, h)
        grads: list = [None, None]
        for i, (mix, param) in enumerate(((self.wm, mean_weight), (self.wv, var_weight))):
            if need[i]:  # dL/d(mixed statistic k) = sum G s_k (G_mu = -A, G_var = -V / 2), then the softmax's Jacobian
                dots = torch.stack([(sums[i] * s[i]).sum() for sums, s in zip(self.sums, self.stats)]).tolist()
                ga = [-d if i == 0 else -0.5 * s[2] * d for d, s in zip(dots, self.stats)]
                inner = math.fsum(m * v for m, v in zip(mix, ga))
                d = [m * (v - inner) for m, v in zip(mix, ga)]
                grads[i] = torch.tensor([0.0] * (param.numel() - len(d)) + d, dtype=param.dtype).reshape(param.shape)
        dw = _out((self.rstd * h).sum(0), weight) if need[2] else None
        db = _out(g.sum(0), bias) if need[3] else None
        return grads[0], grads[1], dw, db


class BatchInstanceStats(Description):
    """Batch-instance norm (Nam & Kim, NeurIPS 2018): ``y = w (rho (x - mu_B) r_B + (1 - rho)
    (x - mu_I) r_I) + b`` with the batch (per c, or running ``fixed``) and instance (per (n, c))
    moments; centred on ``mu_I``: scale ``w (rho r_B + (1 - rho) r_I)``, shift
    ``w rho r_B (mu_I - mu_B) + b``. Adjoint, with ``G = sum_n g`` and ``H = sum_n (h + (mu_I -
    mu_B) g)`` (the batch branch's sums)::

        dx = w rho r_B (dy - G / NL - (x - mu_B) r_B^2 H / NL)          (batch statistics)
           + w (1 - rho) r_I (dy - g / L - (x - mu_I) r_I^2 h / L)
        drho = w (r_B H - sum_n r_I h)     dweight = rho r_B H + (1 - rho) sum_n r_I h"""

    def __init__(self, eps: float, fixed: tuple[Tensor, Tensor] | None) -> None:
        self.eps, self.fixed = eps, fixed

    def coefficients(self, mean, m2, count, rho, weight=None, bias=None):
        n, c = mean.shape
        if self.fixed is None:
            self.batch_moments = bn = _moments.reduce_moments(Moments(count, mean, m2), 0)
            mu_b, v_b = bn.mean, bn.var
        else:
            mu_b, v_b = self.fixed
        self.r_b = torch.rsqrt(v_b + self.eps)
        self.r_i = (m2 * (1.0 / max(count, 1))).add_(self.eps).rsqrt_()
        self.p, self.w = rho.detach().to(torch.float64).view(1, c), _row(weight, c, 1.0)
        # the two branches' scales w rho r_B and w (1 - rho) r_I (kept for the adjoint), and mu_I - mu_B
        self.a_b, self.a_i = self.w * self.p * self.r_b, (self.w - self.w * self.p) * self.r_i
        self.diff, self.count = mean - mu_b, count
        self.scale = self.a_b + self.a_i
        return mean, self.scale, torch.addcmul(_row(bias, c, 0.0), self.a_b, self.diff)

    def _sums(self, g: Tensor, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """G, H and sum_n r_I h (kept: the input's and the parameters' gradients both read them)."""
        if getattr(self, "sums_of", None) is not g:
            big_h = torch.addcmul(h, self.diff, g).sum(0, keepdim=True)
            self.sums, self.sums_of = (g.sum(0, keepdim=True), big_h, (self.r_i * h).sum(0, keepdim=True)), g
        return self.sums

    def input_grad(self, g, h, *params):
        big_g, big_h, _ = self._sums(g, h)
        length = self.count
        b_coef = (self.a_i * self.r_i).mul_(self.r_i).mul_(h).mul_(-1.0 / length)
        k_coef = (self.a_i * g).mul_(-1.0 / length)
        if self.fixed is None:  # the batch branch's statistics depend on x too
            nl = g.shape[0] * length
            c_b = (self.a_b * self.r_b).mul_(self.r_b).mul_(big_h)  # w rho r_B^3 H
            b_coef.add_(c_b, alpha=-1.0 / nl)
            k_coef.add_(self.a_b * big_g, alpha=-1.0 / nl).addcmul_(c_b, self.diff, value=-1.0 / nl)
        return self.scale, b_coef, k_coef

    def param_grads(self, g, h, need, rho, weight=None, bias=None):
        big_g, big_h, sum_ih = self._sums(g, h)
        if need[0] or need[1]:
            branches = self.r_b * big_h - sum_ih  # r_B H - sum_n r_I h
        d_rho = _out(self.w * branches, rho) if need[0] else None
        dw = _out(torch.addcmul(sum_ih, self.p, branches), weight) if need[1] else None
        db = _out(big_g, bias) if need[2] else None
        return d_rho, dw, db


class GlobalResponseStats(Description):
    """Global Response Normalization (Woo et al., CVPR 2023): per (n, c) the L2 norm over the
    positions ``G = sqrt(S)``, ``S = sum x^2 = M2 + K mean^2``, divided by its mean over the
    channels, ``N = G / (mean_c G + eps)``; ``y = x (1 + gamma N) + beta`` (the residual inside),
    an affine map per (n, c) with no centre. Adjoint, with ``s = sum dy x`` per (n, c),
    ``A = gamma s`` (the gradient with respect to N) and ``D = mean_c G + eps``::

        dL/dG_nc = A_nc / D_n - mean_c(A_n. G_n.) / D_n^2
        dx = (1 + gamma N) dy + (dL/dG / G) x        dgamma = sum_n N s    dbeta = sum_n g

    (``G`` is clamped at the smallest normal number, as the plain function does, so that an
    all-zero channel has a finite gradient.)"""

    center = False

    def __init__(self, eps: float) -> None:
        self.eps = eps

    def coefficients(self, mean, m2, count, weight=None, bias=None):
        n, c = mean.shape
        self.g = (m2 + count * mean * mean).clamp_min(torch.finfo(torch.float64).tiny).sqrt()
        self.d = self.g.mean(1, keepdim=True) + self.eps
        self.nx = self.g / self.d
        self.gamma = _row(weight, c, 1.0)
        return torch.zeros_like(mean), 1 + self.gamma * self.nx, _row(bias, c, 0.0).expand(n, c)

    def input_grad(self, g, h, *params):
        a = self.gamma * h  # (center 0: h = sum dy x)
        d_g = a / self.d - (a * self.g).mean(1, keepdim=True) / self.d ** 2
        return 1 + self.gamma * self.nx, d_g / self.g, torch.zeros_like(g)

    def param_grads(self, g, h, need, weight=None, bias=None):
        dw = _out((self.nx * h).sum(0), weight) if need[0] else None
        db = _out(g.sum(0), bias) if need[1] else None
        return dw, db
