"""Layer-normalized LSTM (Ba et al. 2016) and batch-normalized LSTM (Cooijmans et al. 2017)
against float64 references written out below from the papers' equations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import BatchNormLSTM, LayerNormLSTM, LayerNormLSTMCell

from conftest import assert_close

TOL = {"rtol": 1e-10, "atol": 1e-10}


def sig(z):
    return 1.0 / (1.0 + np.exp(-z))


def ln_ref(z, gain, shift, eps, groups=1):
    """Layer norm of each row (each of ``groups`` equal blocks separately), then gain and shift."""
    n, d = z.shape
    zg = z.reshape(n, groups, d // groups)
    mu = zg.mean(-1, keepdims=True)
    var = ((zg - mu) ** 2).mean(-1, keepdims=True)
    out = ((zg - mu) / np.sqrt(var + eps)).reshape(n, d)
    return out * (1.0 if gain is None else gain) + (0.0 if shift is None else shift)


def np_params(module):
    return {k: v.detach().numpy().astype(np.float64) for k, v in module.named_parameters()}


def ln_lstm_step_ref(x, h, c, p, prefix="", per_gate=False, eps=1e-5):
    """(i, f, g, o) = LN(W_h h) + LN(W_x x) + b; c' = s(f) c + s(i) tanh(g); h' = s(o) tanh(LN(c'))."""
    G = 4 if per_gate else 1
    q = {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    a = (ln_ref(h @ q["weight_hh"].T, q["ln_hh_weight"], q.get("ln_hh_bias"), eps, G)
         + ln_ref(x @ q["weight_ih"].T, q["ln_ih_weight"], q.get("ln_ih_bias"), eps, G))
    if "bias" in q:
        a = a + q["bias"]
    i, f, g, o = np.split(a, 4, axis=1)
    c = sig(f) * c + sig(i) * np.tanh(g)
    h = sig(o) * np.tanh(ln_ref(c, q["ln_cell_weight"], q.get("ln_cell_bias"), eps))
    return h, c


def randomize(module, rng):
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.from_numpy(rng.normal(0.5, 0.5, size=p.shape)))


# ------------------------------------------------------------------ layer-normalized LSTM
@pytest.mark.parametrize("per_gate", [False, True])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_one_step_matches_reference(per_gate, bias):
    rng = np.random.default_rng(0)
    cell = LayerNormLSTMCell(3, 5, bias=bias, per_gate=per_gate, dtype=torch.float64)
    randomize(cell, rng)
    x, h, c = rng.normal(size=(4, 3)), rng.normal(size=(4, 5)), rng.normal(size=(4, 5))
    h1, c1 = cell(torch.from_numpy(x), (torch.from_numpy(h), torch.from_numpy(c)))
    hr, cr = ln_lstm_step_ref(x, h, c, np_params(cell), per_gate=per_gate)
    assert_close(h1, hr, **TOL)
    assert_close(c1, cr, **TOL)
    h0, c0 = cell(torch.from_numpy(x))  # zero state by default
    hr, cr = ln_lstm_step_ref(x, np.zeros((4, 5)), np.zeros((4, 5)), np_params(cell), per_gate=per_gate)
    assert_close(h0, hr, **TOL)
    hu, cu = cell(torch.from_numpy(x[0]), (torch.from_numpy(h[0]), torch.from_numpy(c[0])))  # unbatched
    assert hu.shape == (5,)
    assert_close(hu, h1[0], **TOL)


def test_per_gate_differs_from_whole_vector():
    rng = np.random.default_rng(1)
    a = LayerNormLSTMCell(3, 4, dtype=torch.float64)
    b = LayerNormLSTMCell(3, 4, per_gate=True, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = torch.from_numpy(rng.normal(size=(2, 3)))
    assert not torch.allclose(a(x)[0], b(x)[0])


@pytest.mark.parametrize("batch_first", [False, True])
def test_multi_layer_sequence_matches_reference(batch_first):
    rng = np.random.default_rng(2)
    L, N, I, H, layers = 6, 3, 2, 4, 2
    m = LayerNormLSTM(I, H, num_layers=layers, batch_first=batch_first, dtype=torch.float64)
    randomize(m, rng)
    x = rng.normal(size=(L, N, I))
    h0, c0 = rng.normal(size=(layers, N, H)), rng.normal(size=(layers, N, H))
    xin = torch.from_numpy(x.transpose(1, 0, 2).copy() if batch_first else x)
    out, (h_n, c_n) = m(xin, (torch.from_numpy(h0), torch.from_numpy(c0)))
    p = np_params(m)
    seq = x
    hs, cs = [], []
    for layer in range(layers):
        h, c = h0[layer], c0[layer]
        outs = []
        for t in range(L):
            h, c = ln_lstm_step_ref(seq[t], h, c, p, prefix=f"cells.{layer}.")
            outs.append(h)
        seq = np.stack(outs)
        hs.append(h)
        cs.append(c)
    assert_close(out, seq.transpose(1, 0, 2) if batch_first else seq, **TOL)
    assert_close(h_n, np.stack(hs), **TOL)
    assert_close(c_n, np.stack(cs), **TOL)
    out_u, (hu, _) = m(xin[:, 0] if batch_first else xin[:, 0], (torch.from_numpy(h0[:, 0]), torch.from_numpy(c0[:, 0])))
    if not batch_first:  # unbatched input is (L, I) whatever batch_first says, as in nn.LSTM
        assert_close(out_u, out[:, 0], **TOL)
        assert_close(hu, h_n[:, 0], **TOL)


@pytest.mark.parametrize("cls", ["ln", "bn"])
@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("unbatched", [False, True])
def test_shapes_match_nn_lstm(cls, batch_first, unbatched):
    L, N, I, H = 5, 3, 4, 6
    ref = nn.LSTM(I, H, num_layers=1, batch_first=batch_first)
    if cls == "ln":
        m = LayerNormLSTM(I, H, batch_first=batch_first)
    else:
        m = BatchNormLSTM(I, H, max_length=L, batch_first=batch_first).eval()
    shape = (L, I) if unbatched else ((N, L, I) if batch_first else (L, N, I))
    x = torch.randn(shape)
    (o1, (h1, c1)), (o2, (h2, c2)) = ref(x), m(x)
    assert o1.shape == o2.shape and h1.shape == h2.shape and c1.shape == c2.shape
    state = (torch.randn(h1.shape), torch.randn(c1.shape))
    assert m(x, state)[0].shape == ref(x, state)[0].shape
    if cls == "ln":  # the same gate packing: nn.LSTM's weights load
        m.cells[0].weight_ih.data.copy_(ref.weight_ih_l0.data)
        m.cells[0].weight_hh.data.copy_(ref.weight_hh_l0.data)


def test_ln_lstm_trains_with_batch_one_and_is_the_same_in_eval():
    m = LayerNormLSTM(2, 3, num_layers=2)
    x = torch.randn(4, 1, 2)
    out = m(x)[0]
    out.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    m.eval()
    assert torch.equal(m(x)[0], out.detach())


@pytest.mark.parametrize("per_gate", [False, True])
def test_gradcheck_tiny_cell(per_gate):
    cell = LayerNormLSTMCell(2, 2, per_gate=per_gate, dtype=torch.float64)
    randomize(cell, np.random.default_rng(3))
    names = [n for n, _ in cell.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in cell.parameters())
    x, h, c = (torch.randn(3, k, dtype=torch.float64, requires_grad=True) for k in (2, 2, 2))

    def f(x, h, c, *ps):
        out = torch.func.functional_call(cell, dict(zip(names, ps)), (x, (h, c)))
        return out

    assert torch.autograd.gradcheck(f, (x, h, c) + params)


def test_ln_lstm_state_dict_round_trip():
    a = LayerNormLSTM(3, 4, num_layers=2, batch_first=True, per_gate=True)
    b = LayerNormLSTM(3, 4, num_layers=2, batch_first=True, per_gate=True)
    sd = a.state_dict()
    assert {"cells.1.weight_hh", "cells.0.ln_cell_bias", "cells.0.ln_ih_weight", "cells.1.bias"} <= set(sd)
    b.load_state_dict(sd)
    x = torch.randn(2, 5, 3)
    assert torch.equal(a(x)[0], b(x)[0])


# ------------------------------------------------------------------ batch-normalized LSTM
class RefBNLSTM:
    """Cooijmans et al.: BN(W_h h; gamma_h, 0) + BN(W_x x; gamma_x, 0) + b, h = s(o) tanh(BN(c;
    gamma_c, beta_c)), with batch/population statistics per time step (momentum update,
    unbiased population variance), the last step's reused beyond max_length."""

    def __init__(self, module):
        self.p = np_params(module)
        self.T, self.mom, self.eps = module.max_length, module.momentum, module.eps
        H = module.hidden_size
        self.rm = {k: np.zeros((self.T, s)) for k, s in (("ih", 4 * H), ("hh", 4 * H), ("cell", H))}
        self.rv = {k: np.ones((self.T, s)) for k, s in (("ih", 4 * H), ("hh", 4 * H), ("cell", H))}

    def bn(self, z, part, t, gamma, beta, training):
        if training:
            n = z.shape[0]
            mu, var = z.mean(0), ((z - z.mean(0)) ** 2).mean(0)
            self.rm[part][t] = (1 - self.mom) * self.rm[part][t] + self.mom * mu
            self.rv[part][t] = (1 - self.mom) * self.rv[part][t] + self.mom * var * n / (n - 1)
        else:
            s = min(t, self.T - 1)
            mu, var = self.rm[part][s], self.rv[part][s]
        return (z - mu) / np.sqrt(var + self.eps) * gamma + beta

    def run(self, x, training):
        p = self.p
        N, H = x.shape[1], p["weight_hh"].shape[1]
        h, c = np.zeros((N, H)), np.zeros((N, H))
        outs = []
        for t in range(x.shape[0]):
            a = (self.bn(h @ p["weight_hh"].T, "hh", t, p["bn_hh_weight"], 0.0, training)
                 + self.bn(x[t] @ p["weight_ih"].T, "ih", t, p["bn_ih_weight"], 0.0, training) + p["bias"])
            i, f, g, o = np.split(a, 4, axis=1)
            c = sig(f) * c + sig(i) * np.tanh(g)
            h = sig(o) * np.tanh(self.bn(c, "cell", t, p["bn_cell_weight"], p["bn_cell_bias"], training))
            outs.append(h)
        return np.stack(outs), h, c


def test_bn_lstm_initialization():
    m = BatchNormLSTM(3, 4, max_length=5)
    for name in ("bn_ih_weight", "bn_hh_weight", "bn_cell_weight"):
        assert torch.all(getattr(m, name) == 0.1), name
    assert torch.all(m.bn_cell_bias == 0) and torch.all(m.bias == 0)
    assert m.bn_ih_running_mean.shape == (5, 16) and m.bn_cell_running_var.shape == (5, 4)
    names = {n for n, _ in m.named_parameters()}
    assert not any("ih_bias" in n or "hh_bias" in n for n in names)  # beta_h = beta_x = 0, not learned


def test_bn_lstm_train_then_eval_match_reference_per_step_statistics():
    rng = np.random.default_rng(4)
    L, N, I, H = 4, 5, 3, 2
    m = BatchNormLSTM(I, H, max_length=L, dtype=torch.float64)
    randomize(m, rng)
    ref = RefBNLSTM(m)
    for _ in range(2):
        # a different distribution at every step, so that per-step statistics differ
        x = rng.normal(size=(L, N, I)) * np.arange(1, L + 1)[:, None, None] + np.arange(L)[:, None, None]
        out, (h_n, c_n) = m(torch.from_numpy(x))
        o_r, h_r, c_r = ref.run(x, training=True)
        assert_close(out, o_r, **TOL)
        assert_close(h_n[0], h_r, **TOL)
        assert_close(c_n[0], c_r, **TOL)
    for part in ("ih", "hh", "cell"):
        assert_close(getattr(m, f"bn_{part}_running_mean"), ref.rm[part], **TOL)
        assert_close(getattr(m, f"bn_{part}_running_var"), ref.rv[part], **TOL)
    assert not torch.allclose(m.bn_ih_running_mean[0], m.bn_ih_running_mean[-1])
    m.eval()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = rng.normal(size=(L + 3, 2, I))  # longer than max_length: the last step's statistics
    out, _ = m(torch.from_numpy(x))
    assert_close(out, ref.run(x, training=False)[0], **TOL)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())
    out1, _ = m(torch.from_numpy(x[:, :1]))  # eval: each sequence on its own, batch of one is fine
    assert_close(out1, out[:, :1], **TOL)


@pytest.mark.slow  # ~1 s alone; several seconds on a loaded machine (many tiny batch-norm calls)
def test_bn_lstm_gradcheck_training_mode():
    m = BatchNormLSTM(2, 1, max_length=2, dtype=torch.float64)
    randomize(m, np.random.default_rng(5))
    names = [n for n, _ in m.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in m.parameters())
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(names, ps)), (x,))[0]

    assert torch.autograd.gradcheck(f, (x,) + params)


def test_bn_lstm_state_dict_round_trip():
    a = BatchNormLSTM(3, 4, max_length=6, batch_first=True)
    a(torch.randn(5, 6, 3))
    b = BatchNormLSTM(3, 4, max_length=6, batch_first=True)
    b.load_state_dict(a.state_dict())
    a.eval(), b.eval()
    x = torch.randn(2, 8, 3)
    assert torch.equal(a(x)[0], b(x)[0])


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    "make, x, state, match",
    [
        (lambda: LayerNormLSTM(3, 4), torch.randn(5, 2, 2), None, "input_size=3"),
        (lambda: LayerNormLSTM(3, 4), torch.randn(5, 2, 3, 1), None, "got shape"),
        (lambda: LayerNormLSTM(3, 4, num_layers=2), torch.randn(5, 2, 3), (torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)),
         r"h_0 of shape \(2, 2, 4\)"),
        (lambda: LayerNormLSTM(3, 4), torch.ones(5, 2, 3, dtype=torch.long), None, "floating-point"),
        (lambda: BatchNormLSTM(3, 4, max_length=4), torch.randn(5, 2, 3), None, "exceeds max_length=4"),
        (lambda: BatchNormLSTM(3, 4, max_length=4), torch.randn(4, 1, 3), None, "more than one"),
    ],
)
def test_bad_inputs_name_the_layer(make, x, state, match):
    m = make()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=match) as info:
        m(x, state)
    assert type(m).__name__ in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in m.state_dict().items())


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="hidden_size"):
        LayerNormLSTMCell(3, 0)
    with pytest.raises(ValueError, match="num_layers"):
        LayerNormLSTM(3, 4, num_layers=0)
    with pytest.raises(ValueError, match="max_length"):
        BatchNormLSTM(3, 4, max_length=0)
    with pytest.raises(ValueError, match="momentum"):
        BatchNormLSTM(3, 4, max_length=2, momentum=0.0)
    cell = LayerNormLSTMCell(3, 4)
    with pytest.raises(ValueError, match=r"LayerNormLSTMCell\(3, 4\).*state h"):
        cell(torch.randn(2, 3), (torch.zeros(2, 5), torch.zeros(2, 4)))


def test_exported():
    assert normlab.LayerNormLSTM is LayerNormLSTM and normlab.layers.BatchNormLSTM is BatchNormLSTM
    assert callable(normlab.functional.layer_norm_lstm_cell) and callable(normlab.functional.batch_norm_lstm_cell)
