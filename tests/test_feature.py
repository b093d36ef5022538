"""Per-sample norms (ln, in, gn, rms, lnc, rmsc) against torch's native layers and float64
references written from the papers' definitions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from conftest import assert_close, per_channel_np, ref_normalize
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normlab
from _helpers import randomize_affine
from normlab import ChannelLayerNorm, ChannelRMSNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm

SPECS = ["ln", "in", "gn:2", "rms", "lnc", "rmsc"]


def reference(spec: str, x: np.ndarray, w, b, eps: float, channel_dim: int = 1) -> np.ndarray:
    """The norm's definition in float64 numpy, for any channel axis."""
    x = np.asarray(x, dtype=np.float64)
    nd, cd = x.ndim, channel_dim % x.ndim
    name, _, arg = spec.partition(":")
    if name == "gn":
        g = int(arg)
        xc = np.moveaxis(x, cd, 1)
        shp = xc.shape
        xg = xc.reshape(shp[0], g, shp[1] // g, *shp[2:])
        y = np.moveaxis(ref_normalize(xg, tuple(range(2, xg.ndim)), eps).reshape(shp), 1, cd)
    else:
        axes = {
            "ln": tuple(range(1, nd)),
            "rms": tuple(range(1, nd)),
            "in": tuple(d for d in range(1, nd) if d != cd),
            "lnc": (cd,),
            "rmsc": (cd,),
        }[name]
        y = ref_normalize(x, axes, eps, center=name not in ("rms", "rmsc"))
    if w is not None:
        y = y * per_channel_np(w, nd, cd)
    if b is not None and name not in ("rms", "rmsc"):
        y = y + per_channel_np(b, nd, cd)
    return y


_randomize = randomize_affine


def _wb(m: nn.Module):
    w = m.weight.detach().double().numpy() if m.weight is not None else None
    b = m.bias.detach().double().numpy() if getattr(m, "bias", None) is not None else None
    return w, b


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(3, 4, 5), (2, 4, 3, 5), (2, 4, 2, 3, 2), (5, 4)])
def test_matches_float64_definition(spec, shape):
    if spec == "in" and len(shape) == 2:
        pytest.skip("instance norm needs a spatial axis")
    x = torch.randn(*shape, dtype=torch.float64) * 3 + 2
    m = _randomize(normlab.make_norm(spec, shape[1], eps=1e-4).double())
    assert_close(m(x), reference(spec, x.numpy(), *_wb(m), 1e-4), rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------- vs torch's layers
@pytest.mark.parametrize("shape", [(3, 6), (3, 6, 7), (2, 6, 4, 5), (2, 6, 3, 2, 4)])
@pytest.mark.parametrize("groups", [1, 2, 3, 6])
def test_group_norm_matches_torch(shape, groups):
    ours = _randomize(GroupNorm(6, num_groups=groups))
    ref = nn.GroupNorm(groups, 6)
    ref.load_state_dict(ours.state_dict())
    xa = (torch.randn(*shape) * 2 + 1).requires_grad_()
    xb = xa.detach().clone().requires_grad_()
    ya, yb = ours(xa), ref(xb)
    if groups == 6 and len(shape) == 2:
        # one value per group: x - mean is exactly 0 (torch's Welford leaves ~1e-7 * rstd)
        torch.testing.assert_close(ya, ours.bias.expand_as(ya), rtol=0, atol=0)
        return
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g)
    # tiny groups (2 values) make dx a difference of nearly equal terms: float32 noise ~1e-5
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shape", [(3, 4, 7), (2, 4, 5, 6), (2, 4, 3, 4, 2)])
def test_instance_norm_matches_torch(shape):
    ref = {3: nn.InstanceNorm1d, 4: nn.InstanceNorm2d, 5: nn.InstanceNorm3d}[len(shape)](4, affine=True)
    ours = _randomize(InstanceNorm(4))
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(*shape) * 3 - 1
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    ours.eval(), ref.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_instance_norm_tracking_running_stats_matches_torch():
    ref = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    ours = InstanceNorm(3, track_running_stats=True)
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) * (step + 1) + step
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, k), getattr(ref, k), rtol=1e-5, atol=1e-6)
    # torch's InstanceNorm never counts batches (and treats momentum=None as 0); we count,
    # so that momentum=None is the cumulative average, as for batch norm
    assert int(ours.num_batches_tracked) == 3
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_instance_norm_momentum_none_is_cumulative_average():
    m = InstanceNorm(2, track_running_stats=True, momentum=None).double()
    batches = [torch.randn(3, 2, 6, dtype=torch.float64) * s + s for s in (1.0, 2.0, 3.0)]
    for b in batches:
        m(b)
    # per batch: the batch average of the per-instance means and unbiased variances
    means = [b.numpy().mean(2).mean(0) for b in batches]
    variances = [b.numpy().var(2, ddof=1).mean(0) for b in batches]
    np.testing.assert_allclose(m.running_mean.numpy(), np.mean(means, 0), rtol=1e-12)
    np.testing.assert_allclose(m.running_var.numpy(), np.mean(variances, 0), rtol=1e-12)


def test_layer_norm_matches_torch_over_trailing_dims_and_group_norm_one():
    x = torch.randn(3, 4, 5, 6)
    ours = LayerNorm(4, affine=False)
    torch.testing.assert_close(ours(x), TF.layer_norm(x, (4, 5, 6)), rtol=1e-5, atol=1e-5)
    ours = _randomize(LayerNorm(4))
    ref = nn.GroupNorm(1, 4)
    ref.load_state_dict(ours.state_dict())
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)


def test_rms_norm_matches_torch_over_trailing_dims():
    x = torch.randn(3, 4, 5, 6) + 1
    ours = RMSNorm(4, affine=False, eps=1e-5)
    torch.testing.assert_close(ours(x), TF.rms_norm(x, (4, 5, 6), eps=1e-5), rtol=1e-5, atol=1e-5)
    none_eps = RMSNorm(4, affine=False, eps=None)
    torch.testing.assert_close(none_eps(x), TF.rms_norm(x, (4, 5, 6), eps=None), rtol=1e-6, atol=1e-6)
    tiny = torch.full((2, 4), 1e-4)  # mean(x^2) = 1e-8: eps=None (1.19e-7) dominates, 1e-6 more so
    expected = 1e-4 / np.sqrt(1e-8 + torch.finfo(torch.float32).eps)
    assert_close(none_eps(tiny), np.full((2, 4), expected), rtol=1e-5, atol=0)


def test_channel_norms_match_torch_on_sequences():
    x = torch.randn(3, 7, 8) * 2 + 1
    lnc = _randomize(ChannelLayerNorm(8, channel_dim=-1))
    ref = nn.LayerNorm(8)
    ref.load_state_dict(lnc.state_dict())
    torch.testing.assert_close(lnc(x), ref(x), rtol=1e-5, atol=1e-5)
    rmsc = _randomize(ChannelRMSNorm(8, channel_dim=-1, eps=1e-6))
    ref = nn.RMSNorm(8, eps=1e-6)
    ref.load_state_dict(rmsc.state_dict())
    torch.testing.assert_close(rmsc(x), ref(x), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- defining equivalences
@pytest.mark.parametrize("shape", [(3, 6, 5), (2, 6, 4, 3)])
def test_group_norm_extremes_are_layer_and_instance_norm(shape):
    x = torch.randn(*shape, dtype=torch.float64)
    gn1, ln = GroupNorm(6, num_groups=1).double(), LayerNorm(6).double()
    gnc, inn = GroupNorm(6, num_groups=6).double(), InstanceNorm(6).double()
    for a, b in ((gn1, ln), (gnc, inn)):
        _randomize(a)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(a(x), b(x), rtol=1e-12, atol=1e-12)


def test_layer_norm_on_vectors_is_channel_layer_norm():
    x = torch.randn(5, 9, dtype=torch.float64)
    ln, lnc = _randomize(LayerNorm(9).double()), ChannelLayerNorm(9).double()
    lnc.load_state_dict(ln.state_dict())
    torch.testing.assert_close(ln(x), lnc(x))


# ------------------------------------------------------------------ train / eval
@pytest.mark.parametrize("spec", SPECS)
def test_same_in_train_and_eval_and_batch_independent(spec):
    m = _randomize(normlab.make_norm(spec, 4))
    x = torch.randn(5, 4, 3, 3)
    y_train = m(x)
    m.eval()
    torch.testing.assert_close(m(x), y_train)
    # per-sample: one sample's output does not depend on the others, batch of one works
    m.train()
    torch.testing.assert_close(m(x[2:3]), y_train[2:3], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_gradcheck_float64(spec, channel_dim):
    x = torch.randn(3, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    m = _randomize(normlab.make_norm(spec, 4, channel_dim=channel_dim).double())
    params = [p for p in (m.weight, getattr(m, "bias", None)) if p is not None]

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip(["weight", "bias"][: len(ps)], ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


# ----------------------------------------------------------- state dicts, dtypes
@pytest.mark.parametrize("spec,keys", [
    ("ln", ["weight", "bias"]), ("in", ["weight", "bias"]), ("gn:2", ["weight", "bias"]),
    ("rms", ["weight"]), ("lnc", ["weight", "bias"]), ("rmsc", ["weight"]),
])
def test_state_dict_round_trip(spec, keys):
    a = _randomize(normlab.make_norm(spec, 4))
    assert list(a.state_dict()) == keys
    b = normlab.make_norm(spec, 4)
    assert torch.all(b.weight == 1) and (getattr(b, "bias", None) is None or torch.all(b.bias == 0))
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(a(x), b(x))
    assert normlab.make_norm(spec, 4, affine=False).state_dict() == {}


def test_instance_norm_tracking_state_dict_is_torch_compatible():
    ref = nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    ref(torch.randn(4, 3, 5, 5) + 2)
    ours = InstanceNorm(3, track_running_stats=True)
    ours.load_state_dict(ref.state_dict())
    ours.eval(), ref.eval()
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(ours(x), ref(x))


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channel_dim", [1, -1])
def test_half_inputs_close_to_float32(spec, dtype, channel_dim):
    x = torch.randn(4, 8, 6, 8) * 3 + 5
    m = _randomize(normlab.make_norm(spec, 8, channel_dim=channel_dim))
    y32 = m(x)
    yh = m(x.to(dtype))
    assert yh.dtype == dtype
    tol = 2e-2 if dtype == torch.float16 else 6e-2
    torch.testing.assert_close(yh.float(), y32, rtol=tol, atol=tol)
    torch.testing.assert_close(m.to(dtype)(x.to(dtype)).float(), y32, rtol=tol, atol=tol)


@given(
    spec=st.sampled_from(SPECS),
    n=st.integers(1, 3),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    spatial=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    eps=st.sampled_from([1e-6, 1e-5, 0.1]),
)
def test_hypothesis_shapes_vs_float64(spec, n, groups, per_group, spatial, eps):
    if spec == "in" and (not spatial or np.prod(spatial) == 1):
        spatial = [*spatial, 2]
    c = groups * per_group
    spec = f"gn:{groups}" if spec.startswith("gn") else spec
    x = torch.randn(n, c, *spatial, dtype=torch.float64) * 2 - 1
    m = _randomize(normlab.make_norm(spec, c, eps=eps).double())
    assert_close(m(x), reference(spec, x.numpy(), *_wb(m), eps), rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------- bad input
@pytest.mark.parametrize("spec", SPECS)
def test_bad_inputs_name_the_layer(spec):
    m = normlab.make_norm(spec, 4, check_finite=True)
    name = type(m).__name__
    cases = [
        (torch.randn(2, 5, 3), ["4 channels", "got 5", "(2, 5, 3)"]),
        (torch.randn(4), ["rank >=", "(4,)"]),
        (torch.ones(2, 4, 3, dtype=torch.int32), ["floating", "int32"]),
        (torch.full((2, 4, 3), float("nan")), ["NaN or Inf"]),
        (torch.full((2, 4, 3), float("-inf")), ["NaN or Inf"]),
    ]
    for x, words in cases:
        with pytest.raises((ValueError, TypeError)) as info:
            m(x)
        msg = str(info.value)
        assert msg.startswith(f"{name}(4)"), msg
        for w in words:
            assert w in msg, (w, msg)


def test_instance_norm_empty_batch_leaves_running_stats():
    m = InstanceNorm(3, track_running_stats=True)
    m(torch.randn(2, 3, 4) + 1)
    before = m.running_mean.clone(), m.running_var.clone()
    assert m(torch.randn(0, 3, 4)).shape == (0, 3, 4)
    torch.testing.assert_close(m.running_mean, before[0])
    torch.testing.assert_close(m.running_var, before[1])


def test_instance_norm_needs_positions_and_keeps_stats_on_failure():
    m = InstanceNorm(3, track_running_stats=True)
    m(torch.randn(2, 3, 4))
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(ValueError, match=r"InstanceNorm\(3\).*rank >= 3.*\(2, 3\)"):
        m(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"InstanceNorm\(3\).*more than one value.*\(2, 3, 1\)"):
        m(torch.randn(2, 3, 1))
    with pytest.raises(ValueError, match=r"InstanceNorm\(3\).*3 channels.*got 4"):
        m(torch.randn(2, 4, 5))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])
    m.eval()  # eval uses the running stats: one position is fine then
    assert m(torch.randn(2, 3, 1)).shape == (2, 3, 1)


@pytest.mark.parametrize("groups", [0, -1, 3, 5, 2.0])
def test_group_norm_groups_must_divide(groups):
    with pytest.raises(ValueError, match=r"GroupNorm\(4\).*num_groups.*divisor of the 4 channels"):
        GroupNorm(4, num_groups=groups)
    with pytest.raises(ValueError, match="num_groups"):
        normlab.functional.group_norm(torch.randn(2, 4, 3), 3)


@pytest.mark.parametrize("cls", [LayerNorm, InstanceNorm, GroupNorm, RMSNorm, ChannelLayerNorm, ChannelRMSNorm])
@pytest.mark.parametrize("eps", [0.0, -1e-6])
def test_eps_must_be_positive(cls, eps):
    kw = {"num_groups": 2} if cls is GroupNorm else {}
    with pytest.raises(ValueError, match=rf"{cls.__name__}: eps must be > 0"):
        cls(4, eps=eps, **kw)


@pytest.mark.parametrize("cls", [LayerNorm, InstanceNorm, ChannelLayerNorm])
def test_eps_none_only_for_rms(cls):
    with pytest.raises(ValueError, match="eps"):
        cls(4, eps=None)


def test_instance_norm_negative_momentum():
    with pytest.raises(ValueError, match=r"InstanceNorm: momentum"):
        InstanceNorm(4, momentum=-0.5, track_running_stats=True)


@pytest.mark.parametrize("spec", SPECS)
def test_channel_dim_out_of_range(spec):
    m = normlab.make_norm(spec, 4, channel_dim=4)
    with pytest.raises(ValueError, match=r"\(4\).*channel_dim=4.*out of range.*rank 4"):
        m(torch.randn(2, 4, 3, 3))
    m = normlab.make_norm(spec, 4, channel_dim=-5)
    with pytest.raises(ValueError, match="channel_dim=-5"):
        m(torch.randn(2, 4, 3, 4))


# --------------------------------------------------------------------- compile
@pytest.mark.slow
@pytest.mark.parametrize("spec,channel_dim", [(s, 1) for s in SPECS] + [("lnc", -1), ("rmsc", -1)])
def test_torch_compile_fullgraph(spec, channel_dim):
    m = _randomize(normlab.make_norm(spec, 4, channel_dim=channel_dim))
    compiled = torch.compile(m, fullgraph=True)
    x = torch.randn(3, 4, 5, 6)
    x = x if channel_dim == 1 else x.movedim(1, -1)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = m(xa), compiled(xb)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    ya.sum().backward()
    yb.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
