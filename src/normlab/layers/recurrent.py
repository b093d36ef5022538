"""Normalized LSTMs with ``torch.nn.LSTM``'s interface: layer-normalized (Ba et al. 2016) and
batch-normalized with per-time-step statistics (Cooijmans et al. 2017).

``forward(x, state=None) -> (output, (h_n, c_n))`` with nn.LSTM's shapes: ``x`` is
``(L, N, input_size)`` (``(N, L, input_size)`` with ``batch_first``) or unbatched
``(L, input_size)``; ``state = (h_0, c_0)`` each ``(num_layers, N, hidden_size)`` (or
``(num_layers, hidden_size)`` unbatched), zeros when omitted; ``output`` holds the last
layer's h_t for every step. Weights are packed in nn.LSTM's gate order (i, f, g, o).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from .. import functional as F

State = tuple[Tensor, Tensor]


def _uniform_(module: nn.Module, hidden_size: int, names: tuple[str, ...]) -> None:
    # nn.LSTM's initialization of the projection weights
    bound = 1.0 / math.sqrt(hidden_size)
    for name in names:
        nn.init.uniform_(getattr(module, name), -bound, bound)


def _check_float(who: str, x: Any, what: str) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{who}: expected {what} to be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{who}: expected a floating-point {what}, got dtype {x.dtype}")


class _SequenceLSTM(nn.Module):
    """Shape handling shared by the multi-step LSTMs (input layout, default and checked state)."""

    input_size: int
    hidden_size: int
    num_layers: int
    batch_first: bool

    def _who(self) -> str:
        return f"{type(self).__name__}({self.input_size}, {self.hidden_size})"

    def _prepare(self, x: Tensor, state: State | None) -> tuple[Tensor, Tensor, Tensor, bool]:
        """``x`` as ``(L, N, I)``, ``h_0``, ``c_0`` as ``(num_layers, N, H)``, and whether unbatched."""
        who = self._who()
        _check_float(who, x, "input")
        if x.ndim not in (2, 3) or x.shape[-1] != self.input_size:
            layout = "(N, L, input_size)" if self.batch_first else "(L, N, input_size)"
            raise ValueError(f"{who}: expected input {layout} or (L, input_size) with input_size={self.input_size}, "
                             f"got shape {tuple(x.shape)}")
        unbatched = x.ndim == 2
        x = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
        if x.shape[0] == 0:
            raise ValueError(f"{who}: got an empty sequence (length 0), input shape {tuple(x.shape)}")
        shape = (self.num_layers, x.shape[1], self.hidden_size)
        if state is None:
            zeros = x.new_zeros(shape)
            return x, zeros, zeros, unbatched
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            raise TypeError(f"{who}: state must be a pair (h_0, c_0), got {type(state).__name__}")
        h0, c0 = state
        for name, s in (("h_0", h0), ("c_0", c0)):
            _check_float(who, s, name)
            expected = shape[::2] if unbatched else shape
            if tuple(s.shape) != expected:
                raise ValueError(f"{who}: expected {name} of shape {expected}, got {tuple(s.shape)}")
        if unbatched:
            h0, c0 = h0.unsqueeze(1), c0.unsqueeze(1)
        return x, h0, c0, unbatched

    def _finish(self, out: Tensor, h: list[Tensor], c: list[Tensor], unbatched: bool) -> tuple[Tensor, State]:
        h_n, c_n = torch.stack(h), torch.stack(c)
        if unbatched:
            return out.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        return (out.transpose(0, 1) if self.batch_first else out), (h_n, c_n)


class LayerNormLSTMCell(nn.Module):
    r"""One layer-normalized LSTM step (Ba, Kiros & Hinton 2016, arXiv:1607.06450).

    ``(i, f, g, o) = LN(W_h h; a1, b1) + LN(W_x x; a2, b2) + b``, ``c' = s(f) c + s(i) tanh(g)``,
    ``h' = s(o) tanh(LN(c'; a3, b3))``: three separate layer norms, each with its own gain
    (init 1) and bias (init 0). See :func:`normlab.functional.layer_norm_lstm_cell`.

    Args:
        input_size, hidden_size: as ``nn.LSTMCell``.
        bias: learn the gate bias ``b`` (init 0) and the three layer norms' biases; with
            ``False`` the cell has no additive parameters (only the gains).
        per_gate: normalize each gate's H pre-activations separately (TensorFlow's
            ``LayerNormBasicLSTMCell``) instead of the whole 4H vector (the paper).
        eps: the layer norms' eps.

    Parameters: ``weight_ih`` (4H, I), ``weight_hh`` (4H, H) (nn.LSTM's init and gate order),
    ``bias`` (4H), ``ln_ih_weight``/``ln_ih_bias``, ``ln_hh_weight``/``ln_hh_bias`` (4H),
    ``ln_cell_weight``/``ln_cell_bias`` (H).

    ``forward(x, state=None) -> (h', c')`` with ``x`` (N, I) or (I,), ``state = (h, c)``
    each (N, H) or (H,), zeros when omitted (``nn.LSTMCell``'s interface).
    """

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, per_gate: bool = False,
                 eps: float = 1e-5, device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{type(self).__name__}: {name} must be a positive int, got {v!r}")
        if not eps > 0:
            raise ValueError(f"{type(self).__name__}: eps must be > 0, got {eps!r}")
        self.input_size, self.hidden_size = input_size, hidden_size
        self.per_gate, self.eps = per_gate, eps
        f = {"device": device, "dtype": dtype}
        g4 = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g4, input_size, **f))
        self.weight_hh = nn.Parameter(torch.empty(g4, hidden_size, **f))
        self.bias = nn.Parameter(torch.zeros(g4, **f)) if bias else None
        for part, size in (("ih", g4), ("hh", g4), ("cell", hidden_size)):
            setattr(self, f"ln_{part}_weight", nn.Parameter(torch.ones(size, **f)))
            setattr(self, f"ln_{part}_bias", nn.Parameter(torch.zeros(size, **f)) if bias else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_(self, self.hidden_size, ("weight_ih", "weight_hh"))
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.startswith("ln_"):
                nn.init.ones_(p)

    def forward(self, x: Tensor, state: State | None = None) -> State:
        who = f"{type(self).__name__}({self.input_size}, {self.hidden_size})"
        _check_float(who, x, "input")
        if x.ndim not in (1, 2) or x.shape[-1] != self.input_size:
            raise ValueError(f"{who}: expected input (N, {self.input_size}) or ({self.input_size},), "
                             f"got shape {tuple(x.shape)}")
        unbatched = x.ndim == 1
        xb = x.unsqueeze(0) if unbatched else x
        shape = (xb.shape[0], self.hidden_size)
        if state is None:
            h = c = xb.new_zeros(shape)
        else:
            h, c = state
            for name, s in (("h", h), ("c", c)):
                _check_float(who, s, f"state {name}")
                if tuple(s.shape) != (shape[1:] if unbatched else shape):
                    raise ValueError(f"{who}: expected state {name} of shape {shape[1:] if unbatched else shape}, "
                                     f"got {tuple(s.shape)}")
            if unbatched:
                h, c = h.unsqueeze(0), c.unsqueeze(0)
        h, c = self._step(xb, h, c)
        return (h.squeeze(0), c.squeeze(0)) if unbatched else (h, c)

    def _step(self, x: Tensor, h: Tensor, c: Tensor) -> State:
        return F.layer_norm_lstm_cell(
            x, h, c, self.weight_ih, self.weight_hh, self.bias,
            (self.ln_ih_weight, self.ln_ih_bias), (self.ln_hh_weight, self.ln_hh_bias),
            (self.ln_cell_weight, self.ln_cell_bias), per_gate=self.per_gate, eps=self.eps,
        )

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, bias={self.bias is not None}, "
                f"per_gate={self.per_gate}, eps={self.eps}")


class LayerNormLSTM(_SequenceLSTM):
    r"""A stack of :class:`LayerNormLSTMCell` layers run over a sequence (Ba et al. 2016).

    Drop-in for ``nn.LSTM(input_size, hidden_size, num_layers, batch_first=...)``:
    ``forward(x, state=None) -> (output, (h_n, c_n))`` with the same shapes (see the module
    docstring). Layer l's parameters are ``cells.l.*``. Behaves the same in train and eval.
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, batch_first: bool = False,
                 per_gate: bool = False, bias: bool = True, eps: float = 1e-5,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if not isinstance(num_layers, int) or isinstance(num_layers, bool) or num_layers <= 0:
            raise ValueError(f"{type(self).__name__}: num_layers must be a positive int, got {num_layers!r}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.batch_first, self.per_gate = batch_first, per_gate
        self.cells = nn.ModuleList(
            LayerNormLSTMCell(input_size if l == 0 else hidden_size, hidden_size, bias, per_gate, eps, device, dtype)
            for l in range(num_layers)
        )

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        seq, h0, c0, unbatched = self._prepare(x, state)
        h_n, c_n = [], []
        for layer, cell in enumerate(self.cells):
            h, c = h0[layer], c0[layer]
            outs = []
            for t in range(seq.shape[0]):
                h, c = cell._step(seq[t], h, c)
                outs.append(h)
            seq = torch.stack(outs)
            h_n.append(h)
            c_n.append(c)
        return self._finish(seq, h_n, c_n, unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"batch_first={self.batch_first}, per_gate={self.per_gate}")


class BatchNormLSTM(_SequenceLSTM):
    r"""Batch-normalized LSTM (Cooijmans, Ballas, Laurent, Gulcehre & Courville, ICLR 2017,
    arXiv:1603.09025), one layer.

    ``(i, f, g, o) = BN(W_h h; gamma_h) + BN(W_x x; gamma_x) + b``,
    ``h' = s(o) tanh(BN(c'; gamma_c, beta_c))``; see
    :func:`normlab.functional.batch_norm_lstm_cell`. As the paper prescribes:

    - separate batch statistics, and separate population statistics, for each time step
      t < ``max_length``; in eval, steps at or beyond ``max_length`` reuse the last step's
      population statistics (training on sequences longer than ``max_length`` is an error);
    - gammas initialised to 0.1 (``gamma_init``), beta_c to 0; the projections' shifts are
      fixed at 0 (b, init 0, provides the shift); gammas and betas are shared across time;
    - the cell state is not normalized, only its readout.

    Parameters: ``weight_ih``, ``weight_hh``, ``bias`` (nn.LSTM's init and gate order),
    ``bn_ih_weight``, ``bn_hh_weight`` (4H), ``bn_cell_weight``, ``bn_cell_bias`` (H).
    Buffers (population statistics, one row per time step, variance stored unbiased as in
    torch's batch norm): ``bn_{ih,hh}_running_{mean,var}`` (max_length, 4H) and
    ``bn_cell_running_{mean,var}`` (max_length, H). Training needs a batch of more than one.
    """

    num_layers = 1

    def __init__(self, input_size: int, hidden_size: int, max_length: int, batch_first: bool = False,
                 bias: bool = True, momentum: float = 0.1, eps: float = 1e-5, gamma_init: float = 0.1,
                 device: Any = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        for arg, v in (("input_size", input_size), ("hidden_size", hidden_size), ("max_length", max_length)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}: {arg} must be a positive int, got {v!r}")
        if not 0 < momentum <= 1:
            raise ValueError(f"{name}: momentum must be in (0, 1], got {momentum!r}")
        if not eps > 0:
            raise ValueError(f"{name}: eps must be > 0, got {eps!r}")
        self.input_size, self.hidden_size, self.max_length = input_size, hidden_size, max_length
        self.batch_first, self.momentum, self.eps, self.gamma_init = batch_first, momentum, eps, gamma_init
        f = {"device": device, "dtype": dtype}
        g4 = 4 * hidden_size
        self.weight_ih = nn.Parameter(torch.empty(g4, input_size, **f))
        self.weight_hh = nn.Parameter(torch.empty(g4, hidden_size, **f))
        self.bias = nn.Parameter(torch.empty(g4, **f)) if bias else None
        self.bn_ih_weight = nn.Parameter(torch.empty(g4, **f))
        self.bn_hh_weight = nn.Parameter(torch.empty(g4, **f))
        self.bn_cell_weight = nn.Parameter(torch.empty(hidden_size, **f))
        self.bn_cell_bias = nn.Parameter(torch.empty(hidden_size, **f))
        for part, size in (("ih", g4), ("hh", g4), ("cell", hidden_size)):
            self.register_buffer(f"bn_{part}_running_mean", torch.zeros(max_length, size, **f))
            self.register_buffer(f"bn_{part}_running_var", torch.ones(max_length, size, **f))
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        for part in ("ih", "hh", "cell"):
            getattr(self, f"bn_{part}_running_mean").zero_()
            getattr(self, f"bn_{part}_running_var").fill_(1)

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        _uniform_(self, self.hidden_size, ("weight_ih", "weight_hh"))
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        for p in (self.bn_ih_weight, self.bn_hh_weight, self.bn_cell_weight):
            nn.init.constant_(p, self.gamma_init)
        nn.init.zeros_(self.bn_cell_bias)

    def _stats(self, part: str, t: int) -> tuple[Tensor, Tensor]:
        t = min(t, self.max_length - 1)  # beyond max_length (eval only): the last step's statistics
        return getattr(self, f"bn_{part}_running_mean")[t], getattr(self, f"bn_{part}_running_var")[t]

    def forward(self, x: Tensor, state: State | None = None) -> tuple[Tensor, State]:
        seq, h0, c0, unbatched = self._prepare(x, state)
        who = self._who()
        if self.training and seq.shape[0] > self.max_length:
            raise ValueError(f"{who}: a training sequence of length {seq.shape[0]} exceeds max_length="
                             f"{self.max_length} (population statistics exist for {self.max_length} steps); "
                             f"build the layer with a larger max_length")
        if self.training and seq.shape[1] < 2:
            raise ValueError(f"{who}: training needs a batch of more than one sequence for the per-step batch "
                             f"statistics, got input shape {tuple(x.shape)}; use eval()")
        h, c = h0[0], c0[0]
        outs = []
        for t in range(seq.shape[0]):
            h, c = F.batch_norm_lstm_cell(
                seq[t], h, c, self.weight_ih, self.weight_hh, self.bias, self.bn_ih_weight, self.bn_hh_weight,
                (self.bn_cell_weight, self.bn_cell_bias), self._stats("ih", t), self._stats("hh", t),
                self._stats("cell", t), training=self.training, momentum=self.momentum, eps=self.eps,
            )
            outs.append(h)
        return self._finish(torch.stack(outs), [h], [c], unbatched)

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, max_length={self.max_length}, "
                f"batch_first={self.batch_first}, momentum={self.momentum}, gamma_init={self.gamma_init}")
