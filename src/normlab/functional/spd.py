"""Riemannian batch normalization for symmetric positive definite (SPD) matrices.

Brooks, Schwander, Barbaresco, Schneider & Cord, "Riemannian batch normalization for SPD
neural networks", NeurIPS 2019 (arXiv:1909.02414), under the affine-invariant metric.
Matrix functions go through the eigendecomposition, with the Daleckii-Krein backward (the
paper's eigen backprop) written so that equal eigenvalues (the identity, which the running
mean and the bias start at) have a finite gradient, unlike ``torch.linalg.eigh``'s.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "spd_function",
    "sqrtm",
    "invsqrtm",
    "logm",
    "expm_sym",
    "powm",
    "spd_log",
    "spd_exp",
    "karcher_mean",
    "spd_geodesic",
    "spd_batch_norm",
    "bimap",
    "re_eig",
    "log_eig",
]

Fn = Callable[[Tensor], Tensor]


def _sym(a: Tensor) -> Tensor:
    return 0.5 * (a + a.transpose(-1, -2))


class _SpectralFunction(torch.autograd.Function):
    """f(P) = U diag(f(s)) U^T for symmetric P = U diag(s) U^T.

    Backward (Daleckii-Krein): dP = U (K o (U^T sym(dY) U)) U^T with
    K_ij = (f(s_i) - f(s_j)) / (s_i - s_j), and K_ij = f'((s_i + s_j) / 2) where the two
    eigenvalues (nearly) coincide, the limit of the divided difference.
    """

    @staticmethod
    def forward(ctx, p: Tensor, f: Fn, fprime: Fn) -> Tensor:  # type: ignore[override]
        s, u = torch.linalg.eigh(p)
        fs = f(s)
        ctx.save_for_backward(s, u, fs)
        ctx.fprime = fprime
        return (u * fs.unsqueeze(-2)) @ u.transpose(-1, -2)

    @staticmethod
    @once_differentiable  # the backward's own inputs (s, u) carry no graph
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        s, u, fs = ctx.saved_tensors
        si, sj = s.unsqueeze(-1), s.unsqueeze(-2)
        diff = si - sj
        scale = torch.maximum(si.abs(), sj.abs()).clamp_min(torch.finfo(s.dtype).tiny)
        close = diff.abs() <= scale * (100 * torch.finfo(s.dtype).eps) ** 0.5
        divided = (fs.unsqueeze(-1) - fs.unsqueeze(-2)) / torch.where(close, torch.ones_like(diff), diff)
        k = torch.where(close, ctx.fprime(0.5 * (si + sj)), divided)
        ut = u.transpose(-1, -2)
        g = u @ (k * (ut @ _sym(grad) @ u)) @ ut
        return g, None, None


def spd_function(p: Tensor, f: Fn, fprime: Fn) -> Tensor:
    """Apply the scalar function ``f`` (derivative ``fprime``) to the eigenvalues of the
    symmetric matrices ``p`` (..., n, n). The input is symmetrized first, so the gradient
    is that of ``f(sym(p))`` for any perturbation."""
    return _SpectralFunction.apply(_sym(p), f, fprime)


def sqrtm(p: Tensor) -> Tensor:
    """P^{1/2} of SPD matrices."""
    return spd_function(p, torch.sqrt, lambda s: 0.5 * torch.rsqrt(s))


def invsqrtm(p: Tensor) -> Tensor:
    """P^{-1/2} of SPD matrices."""
    return spd_function(p, torch.rsqrt, lambda s: -0.5 * torch.rsqrt(s) / s)


def logm(p: Tensor) -> Tensor:
    """The principal matrix logarithm of SPD matrices (a symmetric matrix)."""
    return spd_function(p, torch.log, torch.reciprocal)


def expm_sym(v: Tensor) -> Tensor:
    """The matrix exponential of symmetric matrices (an SPD matrix)."""
    return spd_function(v, torch.exp, torch.exp)


def powm(p: Tensor, t: float) -> Tensor:
    """P^t of SPD matrices, for a real power t."""
    return spd_function(p, lambda s: s.pow(t), lambda s: t * s.pow(t - 1))


def spd_log(p: Tensor, g: Tensor) -> Tensor:
    """Riemannian log map at G: Log_G(P) = G^{1/2} logm(G^{-1/2} P G^{-1/2}) G^{1/2}."""
    gs, gi = sqrtm(g), invsqrtm(g)
    return gs @ logm(gi @ p @ gi) @ gs


def spd_exp(v: Tensor, g: Tensor) -> Tensor:
    """Riemannian exp map at G: Exp_G(V) = G^{1/2} expm(G^{-1/2} V G^{-1/2}) G^{1/2}."""
    gs, gi = sqrtm(g), invsqrtm(g)
    return _sym(gs @ expm_sym(gi @ v @ gi) @ gs)


def karcher_mean(p: Tensor, steps: int = 1, alpha: float = 1.0) -> Tensor:
    r"""Karcher (Frechet) mean of the SPD matrices ``p`` (B, n, n) by Karcher flow.

    Starts from the arithmetic mean G_0 and takes ``steps`` steps of
    ``G <- Exp_G(alpha * (1/B) sum_i Log_G(P_i))``; the reference code (torchspdnet's
    ``BaryGeom``) takes one step with alpha = 1. The tangent mean is computed at the
    identity after whitening by G^{-1/2}: G <- G^{1/2} expm(alpha/B sum_i
    logm(G^{-1/2} P_i G^{-1/2})) G^{1/2}, the same thing with fewer matrix functions.
    """
    g = p.mean(0)
    for _ in range(steps):
        gs, gi = sqrtm(g), invsqrtm(g)
        tangent = logm(gi @ p @ gi).mean(0)
        g = _sym(gs @ expm_sym(alpha * tangent) @ gs)
    return g


def spd_geodesic(a: Tensor, b: Tensor, t: float | Tensor) -> Tensor:
    """The point at ``t`` on the affine-invariant geodesic from A (t=0) to B (t=1):
    A #_t B = A^{1/2} (A^{-1/2} B A^{-1/2})^t A^{1/2}."""
    as_, ai = sqrtm(a), invsqrtm(a)
    w = ai @ b @ ai
    t = float(t)
    return _sym(as_ @ powm(w, t) @ as_)


def spd_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool = True,
    momentum: float | Tensor | None = 0.1,
    karcher_steps: int = 1,
    detach_mean: bool = True,
) -> Tensor:
    r"""Riemannian batch normalization of SPD matrices (Brooks et al., NeurIPS 2019,
    arXiv:1909.02414, Algorithm 1).

    ``x`` holds SPD matrices (..., n, n); every matrix of the batch (all leading axes
    pooled, as the reference pools batch and channels) shares one mean::

        B = Karcher mean of {P_i}  (training)     B = running_mean  (eval)
        P~_i = B^{-1/2} P_i B^{-1/2}              (parallel transport from B to I)
        P^_i = G^{1/2} P~_i G^{1/2}               (transport from I to the SPD bias G)

    In training ``running_mean`` (if given) moves in place along the geodesic toward B by
    ``momentum`` (running <- running #_eta B). ``detach_mean`` treats B as a constant in
    the backward pass, as the reference code does; otherwise the gradient flows through
    the Karcher flow. ``bias=None`` stops at the identity. There is no dispersion
    normalization in this paper.
    """
    n = x.shape[-1]
    flat = x.reshape(-1, n, n)
    if training or running_mean is None:
        if detach_mean:
            with torch.no_grad():
                mean = karcher_mean(flat, karcher_steps)
        else:
            mean = karcher_mean(flat, karcher_steps)
        if training and running_mean is not None and momentum is not None:
            with torch.no_grad():
                running_mean.copy_(spd_geodesic(running_mean, mean.detach().to(running_mean.dtype), momentum))
    else:
        mean = running_mean.to(x.dtype)
    centre = invsqrtm(mean)
    y = centre @ flat @ centre
    if bias is not None:
        gs = sqrtm(bias.to(x.dtype))
        y = gs @ y @ gs
    return _sym(y).reshape(x.shape)


# ---------------------------------------------------------------- SPDNet layers
# Huang & Van Gool, "A Riemannian network for SPD matrix learning", AAAI 2017
# (arXiv:1608.04233); the layers the SPD batch norm paper stacks around its norm.


def bimap(x: Tensor, weight: Tensor) -> Tensor:
    r"""BiMap: Y = W^T X W for SPD X (..., n_in, n_in) and W (n_in, n_out), n_out <= n_in.

    With W of full column rank (semi-orthogonal in SPDNet, W^T W = I) Y is SPD:
    v^T Y v = (W v)^T X (W v) > 0 for v != 0. The output is symmetrized against rounding.
    """
    return _sym(weight.transpose(-1, -2) @ x @ weight)


def re_eig(x: Tensor, eps: float = 1e-4) -> Tensor:
    r"""ReEig: U max(S, eps) U^T, the SPD analogue of ReLU: eigenvalues below ``eps`` are
    raised to ``eps`` (which keeps the matrices well conditioned). Gradient by the
    Daleckii-Krein formula with f'(s) = 1 for s > eps, 0 otherwise."""
    return spd_function(x, lambda s: s.clamp_min(eps), lambda s: (s > eps).to(s.dtype))


def log_eig(x: Tensor) -> Tensor:
    r"""LogEig: U log(S) U^T, the matrix logarithm mapping SPD matrices to the (flat)
    space of symmetric matrices, where an ordinary linear classifier follows."""
    return logm(x)
