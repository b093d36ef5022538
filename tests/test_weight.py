"""Weight normalization and its data-dependent init (Salimans & Kingma 2016), against the
paper's equations in float64 and torch's own weight_norm parametrization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import data_dependent_init, weight_norm


def ref_wn(v: np.ndarray, g: np.ndarray, dim: int | None) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    if dim is None:
        return np.asarray(g, dtype=np.float64) * v / np.sqrt((v**2).sum())
    axes = tuple(i for i in range(v.ndim) if i != dim % v.ndim)
    return np.asarray(g, dtype=np.float64) * v / np.sqrt((v**2).sum(axis=axes, keepdims=True))


@pytest.mark.parametrize(
    "make, dim",
    [(lambda: nn.Linear(5, 4), 0), (lambda: nn.Conv2d(3, 6, 3), 0), (lambda: nn.Conv2d(3, 6, 3), 1),
     (lambda: nn.Conv1d(2, 3, 5), None), (lambda: nn.Conv1d(2, 3, 5), -1)],
)
def test_forward_is_g_v_over_norm_v_and_wrapping_keeps_the_weight(make, dim):
    m = make().double()
    w0 = m.weight.detach().clone()
    weight_norm(m, dim=dim)
    torch.testing.assert_close(m.weight, w0)  # g starts at ||v||
    plist = m.parametrizations.weight
    with torch.no_grad():
        plist.original0.uniform_(0.5, 2.0)
        plist.original1.normal_()
    g, v = plist.original0.detach().numpy(), plist.original1.detach().numpy()
    np.testing.assert_allclose(m.weight.detach().numpy(), ref_wn(v, g, dim), rtol=1e-12)
    if dim is not None:
        d = dim % v.ndim
        assert g.shape == tuple(v.shape[i] if i == d else 1 for i in range(v.ndim))


def test_matches_torch_weight_norm_and_shares_its_state_dict():
    ours = weight_norm(nn.Conv2d(3, 5, 3), dim=0)
    theirs = nn.utils.parametrizations.weight_norm(nn.Conv2d(3, 5, 3), dim=0)
    with torch.no_grad():
        theirs.parametrizations.weight.original0.uniform_(0.5, 2.0)
    sd = theirs.state_dict()
    ours.load_state_dict(sd)
    assert set(ours.state_dict()) == set(sd)
    torch.testing.assert_close(ours.weight, theirs.weight)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(ours(x), theirs(x))


def test_gradients_match_the_papers_formulas():
    m = weight_norm(nn.Linear(6, 4, bias=False).double())
    plist = m.parametrizations.weight
    with torch.no_grad():
        plist.original0.uniform_(0.5, 2.0)
    x = torch.randn(10, 6, dtype=torch.float64)
    target = torch.randn(10, 4, dtype=torch.float64)
    loss = ((m(x) - target) ** 2).sum()
    loss.backward()
    # grad_w of the same loss with w a plain tensor, then the paper's eq. (3)
    w = m.weight.detach().clone().requires_grad_()
    ((x @ w.T - target) ** 2).sum().backward()
    gw = w.grad.numpy()
    g, v = plist.original0.detach().numpy()[:, 0], plist.original1.detach().numpy()
    nv = np.sqrt((v**2).sum(1))
    grad_g = (gw * v).sum(1) / nv
    grad_v = (g / nv)[:, None] * gw - (g * grad_g / nv**2)[:, None] * v
    np.testing.assert_allclose(plist.original0.grad.numpy()[:, 0], grad_g, rtol=1e-10)
    np.testing.assert_allclose(plist.original1.grad.numpy(), grad_v, rtol=1e-9, atol=1e-12)
    # grad_v is orthogonal to w (eq. 4: M_w projects out the weight direction)
    np.testing.assert_allclose((grad_v * v).sum(1), 0, atol=1e-10)


def test_gradcheck():
    m = weight_norm(nn.Conv1d(2, 3, 3).double())
    plist = m.parametrizations.weight
    x = torch.randn(2, 2, 7, dtype=torch.float64)

    def f(g, v):
        return normlab.functional.weight_norm(v, g, 0)

    assert torch.autograd.gradcheck(f, (plist.original0.detach().clone().requires_grad_(),
                                        plist.original1.detach().clone().requires_grad_()))
    assert torch.autograd.gradcheck(lambda x: m(x), (x.requires_grad_(),))


def wn_stack() -> nn.Sequential:
    return nn.Sequential(
        weight_norm(nn.Conv2d(3, 8, 3)), nn.ReLU(),
        weight_norm(nn.Conv2d(8, 8, 3, padding=1)), nn.ReLU(),
        nn.Flatten(),
        weight_norm(nn.Linear(8 * 6 * 6, 16)), nn.ReLU(),
        weight_norm(nn.Linear(16, 5)),
    )


def preactivations(model: nn.Module, x: torch.Tensor) -> list[np.ndarray]:
    outs = []
    hooks = [m.register_forward_hook(lambda m, a, o: outs.append(o.detach().double().numpy()))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return outs


def test_data_dependent_init_standardizes_every_layer_on_the_batch():
    torch.manual_seed(1)
    model = wn_stack()
    x = torch.randn(64, 3, 8, 8) * 3 + 1
    out = data_dependent_init(model, x)
    assert out is model and model.training
    pre = preactivations(model, x)
    assert len(pre) == 4
    for t in pre:
        axes = (0, 2, 3) if t.ndim == 4 else (0,)
        np.testing.assert_allclose(t.mean(axis=axes), 0, atol=1e-4)
        np.testing.assert_allclose(t.var(axis=axes), 1, rtol=1e-3)
    # v was redrawn as N(0, 0.05^2)
    v = model[0].parametrizations.weight.original1
    assert abs(float(v.detach().std()) - 0.05) < 0.02
    # without the init the same stack is far from standardized
    raw = preactivations(wn_stack(), x)
    assert max(abs(t.var(axis=(0, 2, 3) if t.ndim == 4 else (0,)).mean() - 1) for t in raw) > 0.2


def test_init_is_layer_by_layer_not_all_at_once():
    # initializing every layer from the *un*-initialized net (one plain pass) would leave
    # the second layer off unit variance; the sequential init does not
    torch.manual_seed(2)
    model = nn.Sequential(weight_norm(nn.Linear(10, 10)), nn.Tanh(), weight_norm(nn.Linear(10, 3)))
    x = torch.randn(200, 10) * 5
    data_dependent_init(model, x)
    second = preactivations(model, x)[1]
    np.testing.assert_allclose(second.var(axis=0), 1, rtol=1e-3)


def test_sequence_linear_layers_use_the_last_axis_and_init_scale():
    model = nn.Sequential(weight_norm(nn.Linear(4, 6)), nn.ReLU(), weight_norm(nn.Linear(6, 2, bias=False)))
    x = torch.randn(8, 30, 4) + 2
    data_dependent_init(model, x, init_scale=0.5)
    a, b = preactivations(model, x)
    np.testing.assert_allclose(a.mean(axis=(0, 1)), 0, atol=1e-4)
    np.testing.assert_allclose(a.var(axis=(0, 1)), 0.25, rtol=1e-3)
    np.testing.assert_allclose(b.var(axis=(0, 1)), 0.25, rtol=1e-3)  # no bias: scale only


def test_conv_transpose_uses_its_output_axis():
    model = nn.Sequential(weight_norm(nn.ConvTranspose2d(3, 4, 3, stride=2), dim=1), nn.ReLU())
    x = torch.randn(16, 3, 5, 5) - 1
    data_dependent_init(model, x)
    t = model[0](x).detach().double().numpy()
    np.testing.assert_allclose(t.mean(axis=(0, 2, 3)), 0, atol=1e-4)
    np.testing.assert_allclose(t.var(axis=(0, 2, 3)), 1, rtol=1e-3)
    with pytest.raises(ValueError, match="ConvTranspose2d weight-normalized with dim=0"):
        data_dependent_init(weight_norm(nn.ConvTranspose2d(3, 4, 3)), x)


def test_state_dict_round_trip_after_init_and_torch_weight_norm_layers():
    model = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 7)), nn.ReLU(),
                          weight_norm(nn.Linear(7, 3)))
    x = torch.randn(50, 5)
    data_dependent_init(model, x)
    np.testing.assert_allclose(preactivations(model, x)[0].var(axis=0), 1, rtol=1e-3)
    fresh = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(5, 7)), nn.ReLU(),
                          weight_norm(nn.Linear(7, 3)))
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(x), model(x), rtol=0, atol=0)


def test_data_dependent_init_errors():
    with pytest.raises(ValueError, match="no weight-normalized layers"):
        data_dependent_init(nn.Sequential(nn.Linear(2, 2)), torch.randn(3, 2))
    with pytest.raises(ValueError, match="dim=None"):
        data_dependent_init(weight_norm(nn.Linear(2, 2), dim=None), torch.randn(3, 2))
    skipped = nn.ModuleDict({"a": weight_norm(nn.Linear(2, 2)), "b": weight_norm(nn.Linear(2, 2))})
    skipped.forward = lambda x: skipped["a"](x)  # b never runs
    with pytest.raises(ValueError, match=r"\['b'\] did not run"):
        data_dependent_init(skipped, torch.randn(3, 2))
    with pytest.raises(ValueError, match="no tensor attribute"):
        weight_norm(nn.ReLU())
    with pytest.raises(ValueError, match="out of range"):
        weight_norm(nn.Linear(2, 2), dim=2)
