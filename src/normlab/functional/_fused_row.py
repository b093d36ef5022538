"""RMS norm over the channel axis alone (the transformer's RMSNorm) on normlab's compiled
kernels: each row of C channels (one position) is read once forward and once backward::

    y = weight * x * rstd                rstd = 1 / sqrt(mean_c(x^2) + eps), per row
    dx = rstd * weight * dy - x * rstd^3 * sum_c(weight * dy * x) / C
    dweight = sum over rows of dy * x * rstd

torch's CPU RMSNorm is a composite of elementwise ops (several full-size temporaries forward
and backward, two input-sized tensors saved); this saves ``x`` and one value per row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import _kernels

__all__ = ["RowRMSKernel"]


class RowRMSKernel(torch.autograd.Function):
    """``apply(rows, weight, eps)``: ``rows`` a contiguous (M, C) matrix (the channel-last view)."""

    @staticmethod
    def forward(ctx, rows: Tensor, weight: Tensor | None, eps: float) -> Tensor:  # type: ignore[override]
        y = torch.empty_like(rows)
        rstd = _kernels.rowrms_forward(rows, y, eps, weight)
        ctx.eps = eps
        ctx.save_for_backward(rows, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):  # type: ignore[override]
        rows, weight, rstd = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]
        if torch.is_grad_enabled():  # double backward: differentiate a plain recomputation
            with torch.enable_grad():
                xs = rows if rows.requires_grad else rows.detach().requires_grad_()
                y = xs * torch.rsqrt((xs * xs).mean(1, keepdim=True) + ctx.eps)
                y = y * weight if weight is not None else y
                wrt = [t for t, k in ((xs, need_x), (weight, need_w)) if k]
                grads = iter(torch.autograd.grad(y, wrt, dy, create_graph=True))
            return (next(grads) if need_x else None, next(grads) if need_w else None, None)
        dy = dy if dy.is_contiguous() else dy.contiguous()
        dx = torch.empty_like(rows)
        dw = _kernels.rowrms_backward(dy, rows, dx, weight, rstd, bool(need_w))
        return dx if need_x else None, (dw.to(weight.dtype) if need_w else None), None
