"""BatchNorm against torch's native BatchNorm1d/2d/3d and a float64 reference."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import assert_close, per_channel_np, ref_normalize
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normlab
from normlab import BatchNorm

TORCH_BN = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
SHAPES = [(8, 5), (6, 5, 7), (4, 5, 6, 3), (3, 5, 4, 3, 2)]


def _pair(shape, **kw):
    """A normlab BatchNorm and torch's, with the same random affine parameters."""
    c = shape[1]
    ours, ref = BatchNorm(c, **kw), TORCH_BN[len(shape)](c, **kw)
    if ours.affine:
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        ours.weight.data.copy_(ref.weight)
        ours.bias.data.copy_(ref.bias)
    return ours, ref


def _states_equal(a: nn.Module, b: nn.Module, **tol) -> None:
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), **tol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
def test_train_eval_and_running_stats_match_torch(shape, momentum):
    ours, ref = _pair(shape, momentum=momentum)
    for step in range(3):
        x = torch.randn(*shape) * (step + 1) + step
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), ref(xb)
        torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)
        _states_equal(ours, ref, rtol=1e-5, atol=1e-6)
    ours.eval(), ref.eval()
    x = torch.randn(*shape)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_train_output_matches_float64_reference():
    x = torch.randn(7, 3, 4, 5, dtype=torch.float64) * 4 + 2
    bn = BatchNorm(3, eps=1e-3).double()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.5, 2.0, -1.0], dtype=torch.float64))
        bn.bias.copy_(torch.tensor([0.1, 0.0, 3.0], dtype=torch.float64))
    xn = x.numpy()
    expected = ref_normalize(xn, (0, 2, 3), 1e-3) * per_channel_np([0.5, 2.0, -1.0], 4, 1) + per_channel_np(
        [0.1, 0.0, 3.0], 4, 1
    )
    assert_close(bn(x), expected, rtol=1e-10, atol=1e-10)
    # running stats: 0.9 * init + 0.1 * batch, the variance unbiased (Bessel)
    np.testing.assert_allclose(bn.running_mean.numpy(), 0.1 * xn.mean((0, 2, 3)), rtol=1e-12)
    m = 7 * 4 * 5
    var_unbiased = xn.transpose(1, 0, 2, 3).reshape(3, -1).var(1) * m / (m - 1)
    np.testing.assert_allclose(bn.running_var.numpy(), 0.9 + 0.1 * var_unbiased, rtol=1e-12)
    assert int(bn.num_batches_tracked) == 1


def test_momentum_none_is_cumulative_average():
    bn = BatchNorm(2, momentum=None).double()
    batches = [torch.randn(5, 2, 3, dtype=torch.float64) * s + s for s in (1.0, 2.0, 3.0, 4.0)]
    for b in batches:
        bn(b)
    means = [b.numpy().mean((0, 2)) for b in batches]
    variances = [b.numpy().transpose(1, 0, 2).reshape(2, -1).var(1, ddof=1) for b in batches]
    np.testing.assert_allclose(bn.running_mean.numpy(), np.mean(means, 0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), np.mean(variances, 0), rtol=1e-12)
    assert int(bn.num_batches_tracked) == 4


def test_eval_is_fixed_affine_and_train_is_not():
    bn = BatchNorm(3)
    for _ in range(5):
        bn(torch.randn(16, 3) * 2 + 1)
    bn.eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = torch.randn(4, 3)
    y = bn(x)
    expected = (x - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(y, expected)
    # eval: a sample's output does not depend on the rest of the batch, stats untouched
    torch.testing.assert_close(bn(x[:1]), y[:1])
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k])
    bn.train()
    assert not torch.allclose(bn(x)[:1], bn(torch.cat([x[:1], 10 + x[1:]]))[:1])


def test_no_running_stats_uses_batch_stats_in_eval():
    ours, ref = _pair((6, 4, 5), track_running_stats=False)
    assert ours.running_mean is None and ours.num_batches_tracked is None
    ours.eval(), ref.eval()
    x = torch.randn(6, 4, 5)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert set(ours.state_dict()) == set(ref.state_dict()) == {"weight", "bias"}


def test_no_affine():
    ours, ref = _pair((6, 4), affine=False)
    assert ours.weight is None and ours.bias is None
    x = torch.randn(6, 4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert set(ours.state_dict()) == set(ref.state_dict())


def test_parameter_and_buffer_names_and_inits():
    bn = BatchNorm(4)
    assert [n for n, _ in bn.named_parameters()] == ["weight", "bias"]
    assert [n for n, _ in bn.named_buffers()] == ["running_mean", "running_var", "num_batches_tracked"]
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    assert bn.num_batches_tracked.dtype == torch.long and int(bn.num_batches_tracked) == 0
    assert list(bn.state_dict()) == list(nn.BatchNorm2d(4).state_dict())


def test_torch_state_dict_loads_and_gives_same_eval_output():
    ref = nn.BatchNorm2d(5)
    for _ in range(4):
        ref(torch.randn(8, 5, 6, 6) * 3 + 1)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 2)
        ref.bias.uniform_(-1, 1)
    ref.eval()
    ours = BatchNorm(5)
    ours.load_state_dict(ref.state_dict())
    ours.eval()
    x = torch.randn(3, 5, 4, 4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-6)
    # and back: ours -> torch
    back = nn.BatchNorm2d(5)
    back.load_state_dict(ours.state_dict())
    _states_equal(back, ref)


def test_state_dict_round_trip():
    a = BatchNorm(3, momentum=None)
    for _ in range(3):
        a(torch.randn(10, 3, 2))
    b = BatchNorm(3, momentum=None)
    b.load_state_dict(a.state_dict())
    _states_equal(a, b)
    # training continues identically (the cumulative count came along)
    x = torch.randn(10, 3, 2)
    torch.testing.assert_close(a(x), b(x))
    _states_equal(a, b)


def test_old_state_dict_without_num_batches_tracked_loads():
    ref = nn.BatchNorm1d(3)
    sd = ref.state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}  # a checkpoint from before torch added the counter
    ours = BatchNorm(3)
    ours.num_batches_tracked.fill_(7)
    ours.load_state_dict(sd)
    assert int(ours.num_batches_tracked) == 0


def test_gradcheck_float64():
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    bn = BatchNorm(3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    assert torch.autograd.gradcheck(lambda x, w, b: normlab.functional.batch_norm(x, weight=w, bias=b),
                                    (x, bn.weight, bn.bias))
    assert torch.autograd.gradgradcheck(lambda x: bn(x), (x[:3, :, :2].detach().requires_grad_(),))
    bn.eval()
    assert torch.autograd.gradcheck(lambda x: bn(x), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_close_to_float32(dtype):
    x = torch.randn(16, 4, 6, 6) * 3 + 5
    ref = BatchNorm(4)
    half = BatchNorm(4)
    y32 = ref(x)
    yh = half(x.to(dtype))
    assert yh.dtype == dtype
    tol = 1e-2 if dtype == torch.float16 else 4e-2
    torch.testing.assert_close(yh.float(), y32, rtol=tol, atol=tol)
    torch.testing.assert_close(half.running_mean, ref.running_mean, rtol=tol, atol=tol)
    torch.testing.assert_close(half.running_var, ref.running_var, rtol=tol, atol=tol)
    # a layer converted to the half dtype works too
    lowp = BatchNorm(4).to(dtype)
    torch.testing.assert_close(lowp(x.to(dtype)).float(), y32, rtol=tol, atol=tol)


@given(
    n=st.integers(2, 5),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 4), max_size=3),
    eps=st.sampled_from([1e-5, 1e-3, 0.1]),
)
def test_hypothesis_shapes_vs_float64(n, c, spatial, eps):
    shape = (n, c, *spatial)
    x = torch.randn(*shape, dtype=torch.float64) * 2 + 1
    bn = BatchNorm(c, eps=eps).double()
    axes = tuple(d for d in range(len(shape)) if d != 1)
    assert_close(bn(x), ref_normalize(x.numpy(), axes, eps), rtol=1e-9, atol=1e-9)


def test_empty_batch_leaves_running_stats():
    bn = BatchNorm(3)
    bn(torch.randn(4, 3))
    before = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(torch.randn(0, 3, 5))
    assert y.shape == (0, 3, 5)
    torch.testing.assert_close(bn.running_mean, before[0])
    torch.testing.assert_close(bn.running_var, before[1])


def test_batch_of_one_is_fine_with_positions_or_in_eval():
    bn = BatchNorm(3)
    assert bn(torch.randn(1, 3, 4)).shape == (1, 3, 4)
    bn.eval()
    assert bn(torch.randn(1, 3)).shape == (1, 3)


# --------------------------------------------------------------------- bad input
BAD_CALLS = [
    (torch.randn(4, 5), ["BatchNorm(3)", "3 channels", "got 5"]),
    (torch.randn(4, 3, 2).transpose(1, 2), ["BatchNorm(3)", "3 channels", "got 2"]),
    (torch.randn(4), ["BatchNorm(3)", "rank >= 2", "(4,)"]),
    (torch.randint(0, 5, (4, 3)), ["BatchNorm(3)", "floating", "int64"]),
    (torch.randn(1, 3), ["BatchNorm(3)", "more than one value", "(1, 3)"]),
    (torch.tensor([[1.0, float("nan"), 2.0]] * 2), ["BatchNorm(3)", "NaN or Inf"]),
    (torch.tensor([[1.0, float("inf"), 2.0]] * 2), ["BatchNorm(3)", "NaN or Inf"]),
]


@pytest.mark.parametrize("x,words", BAD_CALLS)
def test_bad_input_clear_error_and_state_unchanged(x, words):
    bn = BatchNorm(3, check_finite=True)
    bn(torch.randn(6, 3))
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises((ValueError, TypeError)) as info:
        bn(x)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    for k, v in bn.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_channel_dim_out_of_range():
    bn = BatchNorm(3, channel_dim=3)
    with pytest.raises(ValueError, match=r"BatchNorm\(3\).*channel_dim=3.*out of range.*rank 3"):
        bn(torch.randn(2, 3, 3))
    assert int(bn.num_batches_tracked) == 0
    with pytest.raises(ValueError, match="channel_dim"):
        BatchNorm(3, channel_dim=0)


@pytest.mark.parametrize("kw,words", [
    ({"eps": 0.0}, "eps must be > 0"),
    ({"eps": -1e-5}, "eps must be > 0"),
    ({"eps": None}, "eps"),
    ({"momentum": -0.1}, "momentum"),
    ({"momentum": 1.5}, "momentum"),
])
def test_bad_constructor_arguments(kw, words):
    with pytest.raises(ValueError, match=words) as info:
        BatchNorm(3, **kw)
    assert "BatchNorm" in str(info.value)


@pytest.mark.parametrize("num_features", [0, -2, 2.5, True])
def test_bad_num_features(num_features):
    with pytest.raises(ValueError, match="num_features"):
        BatchNorm(num_features)


@pytest.mark.slow
def test_torch_compile_fullgraph():
    eager, compiled_mod = BatchNorm(4), BatchNorm(4)
    compiled = torch.compile(compiled_mod, fullgraph=True)
    for momentum in (0.1, None):
        eager.momentum = compiled_mod.momentum = momentum
        for _ in range(2):
            x = torch.randn(6, 4, 3, 3)
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            ya, yb = eager(xa), compiled(xb)
            torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
            ya.sum().backward()
            yb.sum().backward()
            torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    _states_equal(compiled_mod, eager, rtol=1e-5, atol=1e-6)
    eager.eval(), compiled_mod.eval()
    x = torch.randn(6, 4, 3, 3)
    torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-5)
