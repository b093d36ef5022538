"""One step of the normalized LSTM cells: layer-normalized (Ba et al. 2016) and batch-normalized
(Cooijmans et al. 2017). Both normalize the input projection, the recurrent projection and the
cell-state readout separately, with the library's own layer, group and batch norm functions.

Gates are packed in torch's ``nn.LSTM`` order (i, f, g, o) along the 4H axis, so weights of a
``torch.nn.LSTM`` layer load unchanged (``weight_ih``, ``weight_hh``; the paper writes the
gates in the order f, i, o, g, which is only notation).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .batch import batch_norm
from .feature import group_norm, layer_norm

Pair = tuple[Tensor | None, Tensor | None]


def _lstm_update(gates: Tensor, cx: Tensor, readout: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """The LSTM recurrence from pre-activations ``(i, f, g, o)`` stacked along the last axis::

        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g);   h_t = sigmoid(o) * tanh(readout(c_t))
    """
    i, f, g, o = gates.chunk(4, dim=-1)
    c = torch.sigmoid(f) * cx + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(readout(c))
    return h, c


def layer_norm_lstm_cell(
    x: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor | None = None,
    norm_ih: Pair = (None, None),
    norm_hh: Pair = (None, None),
    norm_cell: Pair = (None, None),
    *,
    per_gate: bool = False,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    r"""One step of the layer-normalized LSTM (Ba, Kiros & Hinton 2016, arXiv:1607.06450, sec. 3.1 / A).

    For a batch ``x`` (N, I), ``hx``, ``cx`` (N, H), each LN with its own gain and bias
    (``norm_* = (gain, bias)``, either may be None), shared across time::

        (i, f, g, o) = LN(W_h h_{t-1}; alpha_1, beta_1) + LN(W_x x_t; alpha_2, beta_2) + b
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(LN(c_t; alpha_3, beta_3))

    LN normalizes each projection as one 4H vector, as the paper does. ``per_gate=True`` is
    the TensorFlow ``LayerNormBasicLSTMCell`` variant: each gate's H pre-activations are
    normalized separately (group norm with 4 groups), gains and biases still per unit.
    Returns ``(h_t, c_t)``.
    """
    def ln(z: Tensor, params: Pair) -> Tensor:
        if per_gate:
            return group_norm(z, 4, params[0], params[1], eps=eps)
        return layer_norm(z, params[0], params[1], eps=eps)

    gates = ln(hx @ weight_hh.t(), norm_hh) + ln(x @ weight_ih.t(), norm_ih)
    if bias is not None:
        gates = gates + bias
    return _lstm_update(gates, cx, lambda c: layer_norm(c, norm_cell[0], norm_cell[1], eps=eps))


def batch_norm_lstm_cell(
    x: Tensor,
    hx: Tensor,
    cx: Tensor,
    weight_ih: Tensor,
    weight_hh: Tensor,
    bias: Tensor | None,
    gamma_ih: Tensor | None,
    gamma_hh: Tensor | None,
    norm_cell: Pair,
    stats_ih: Pair = (None, None),
    stats_hh: Pair = (None, None),
    stats_cell: Pair = (None, None),
    *,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    r"""One step of the batch-normalized LSTM (Cooijmans, Ballas, Laurent, Gulcehre & Courville,
    ICLR 2017, arXiv:1603.09025, eq. 6-8).

    ::

        (i, f, g, o) = BN(W_h h_{t-1}; gamma_h, 0) + BN(W_x x_t; gamma_x, 0) + b
        c_t = sigmoid(f) * c_{t-1} + sigmoid(i) * tanh(g)
        h_t = sigmoid(o) * tanh(BN(c_t; gamma_c, beta_c))

    BN is :func:`normlab.functional.batch_norm` over the batch, per unit. The shifts of the
    two projections' BNs are fixed at 0 (b provides the shift); the cell state itself is not
    normalized, only its readout. ``stats_* = (running_mean, running_var)`` are the
    population statistics OF THIS TIME STEP (the caller keeps one set per step): updated in
    place by ``momentum`` in training, used instead of the batch moments in eval.
    Returns ``(h_t, c_t)``.
    """
    def bn(z: Tensor, stats: Pair, weight: Tensor | None, shift: Tensor | None) -> Tensor:
        return batch_norm(z, stats[0], stats[1], weight, shift, training=training, momentum=momentum, eps=eps)

    gates = bn(hx @ weight_hh.t(), stats_hh, gamma_hh, None) + bn(x @ weight_ih.t(), stats_ih, gamma_ih, None)
    if bias is not None:
        gates = gates + bias
    return _lstm_update(gates, cx, lambda c: bn(c, stats_cell, norm_cell[0], norm_cell[1]))
