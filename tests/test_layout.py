"""Layouts: the channel axis anywhere, channels-last memory, sequences, and the
transformer-style lnc / rmsc against torch.nn.LayerNorm / RMSNorm."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_close
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import normlab
from _helpers import assert_matches_torch_layer, randomize_affine
from normlab import ChannelLayerNorm, ChannelRMSNorm
from normlab._layout import channel_axis, per_channel, spatial_size, stat_dims

SPECS = ["bn", "ln", "in", "gn:2", "rms", "lnc", "rmsc"]


_randomize = randomize_affine


# ------------------------------------------------------------------ _layout
def test_stat_dims_follow_the_channel_axis():
    assert stat_dims(4, 1, "batch") == (0, 2, 3)
    assert stat_dims(4, -1, "batch") == (0, 1, 2)
    assert stat_dims(4, -1, "sample") == (1, 2, 3)
    assert stat_dims(4, 1, "spatial") == (2, 3)
    assert stat_dims(4, -1, "spatial") == (1, 2)
    assert stat_dims(3, 2, "spatial") == (1,)
    assert stat_dims(4, 1, "channel") == (1,)
    assert stat_dims(3, -1, "channel") == (2,)
    assert stat_dims(2, 1, "spatial") == ()
    with pytest.raises(ValueError, match="unknown statistics axes"):
        stat_dims(3, 1, "pixels")  # type: ignore[arg-type]


def test_channel_axis_errors():
    assert channel_axis(3, -1) == 2
    with pytest.raises(ValueError, match="rank >= 2.*rank 1"):
        channel_axis(1, 1)
    with pytest.raises(ValueError, match="channel_dim=3 is out of range.*rank 3"):
        channel_axis(3, 3)
    with pytest.raises(ValueError, match="batch axis"):
        channel_axis(3, -3)


def test_per_channel_and_spatial_size():
    v = torch.arange(3.0)
    assert per_channel(v, 4, -1).shape == (1, 1, 1, 3)
    assert per_channel(v, 3, 1).shape == (1, 3, 1)
    assert per_channel(None, 3, 1) is None
    assert spatial_size(torch.empty(2, 5, 6, 3), -1) == 30
    assert spatial_size(torch.empty(2, 3), 1) == 1


# ------------------------------------------------- every norm in every layout
@given(
    spec=st.sampled_from(SPECS),
    n=st.integers(2, 3),
    spatial=st.lists(st.integers(2, 4), min_size=1, max_size=3),
    data=st.data(),
)
def test_channel_last_equals_channel_first_after_movedim(spec, n, spatial, data):
    c = 4
    x = torch.randn(n, c, *spatial, dtype=torch.float64) * 2 + 1
    dest = data.draw(st.integers(1, x.ndim - 1), label="channel axis")
    as_neg = data.draw(st.booleans(), label="negative channel_dim")
    cd = dest - x.ndim if as_neg else dest
    first = _randomize(normlab.make_norm(spec, c).double())
    moved = normlab.make_norm(spec, c, channel_dim=cd).double()
    moved.load_state_dict(first.state_dict())
    y_first = first(x)
    xm = x.movedim(1, dest)
    y_moved = moved(xm)
    torch.testing.assert_close(y_moved, y_first.movedim(1, dest), rtol=1e-10, atol=1e-10)
    # the running statistics stay per channel whatever the layout
    if getattr(first, "running_mean", None) is not None:
        torch.testing.assert_close(moved.running_mean, first.running_mean)
        torch.testing.assert_close(moved.running_var, first.running_var)
        first.eval(), moved.eval()
        torch.testing.assert_close(moved(xm), first(x).movedim(1, dest), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spec", SPECS)
def test_sequences_channel_last_match_channel_first(spec):
    x = torch.randn(3, 6, 4)  # (N, L, C)
    a = _randomize(normlab.make_norm(spec, 4, channel_dim=-1))
    b = normlab.make_norm(spec, 4)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(x), b(x.transpose(1, 2)).transpose(1, 2), rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------- channels_last memory
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("train", [True, False])
def test_channels_last_memory_in_and_out(spec, train):
    x = torch.randn(3, 8, 5, 6) * 2 + 1
    xcl = x.contiguous(memory_format=torch.channels_last)
    a = _randomize(normlab.make_norm(spec, 8))
    b = normlab.make_norm(spec, 8)
    b.load_state_dict(a.state_dict())
    a.train(train), b.train(train)
    xa, xb = x.clone().requires_grad_(), xcl.clone().requires_grad_()
    ya, yb = a(xa), b(xb)
    # same values, the output in channels_last memory (strides checked, not just is_contiguous)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)
    assert yb.stride() == xcl.stride(), (yb.stride(), xcl.stride())
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-4, atol=1e-5)
    assert xb.grad.stride() == xcl.stride()


@pytest.mark.parametrize("spec", ["lnc", "rmsc"])
def test_channel_norms_on_channels_last_run_on_a_view(spec):
    # no hidden .contiguous(): the output of a channels_last input shares its layout, and
    # the channel-first layout gives a channel-first output
    x = torch.randn(2, 16, 4, 4).contiguous(memory_format=torch.channels_last)
    m = normlab.make_norm(spec, 16)
    y = m(x)
    assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    y2 = m(x.contiguous())
    assert y2.is_contiguous()
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-6)


# --------------------------------------------- lnc / rmsc and torch's layers
def test_lnc_loads_torch_layer_norm_and_matches_output_and_gradients():
    ref = nn.LayerNorm(12)
    _randomize(ref)
    ours = normlab.make_norm("lnc", 12, channel_dim=-1)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, ChannelLayerNorm)
    x = torch.randn(3, 5, 12) * 3 + 1
    ya = assert_matches_torch_layer(ours, ref, x)  # output, input and weight/bias gradients
    # and back into torch's layer
    back = nn.LayerNorm(12)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ya)


@pytest.mark.parametrize("eps", [1e-6, None])
def test_rmsc_loads_torch_rms_norm_and_matches_output_and_gradients(eps):
    ref = nn.RMSNorm(12, eps=eps)
    _randomize(ref)
    ours = normlab.make_norm("rmsc", 12, channel_dim=-1, eps=eps)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, ChannelRMSNorm)
    x = torch.randn(3, 5, 12) + 0.5
    ya = assert_matches_torch_layer(ours, ref, x)  # output, input and weight gradients
    back = nn.RMSNorm(12, eps=eps)
    back.load_state_dict(ours.state_dict())
    torch.testing.assert_close(back(x), ya)


@pytest.mark.parametrize("contiguous", [True, False])
def test_lnc_channel_first_vs_float64_definition(contiguous):
    # (N, C, H, W), channel_dim=1: at every (n, h, w), mean and variance over the C channels
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64) * 4 + 3
    if not contiguous:
        x = x.contiguous(memory_format=torch.channels_last)
    m = _randomize(ChannelLayerNorm(6, eps=1e-5).double())
    w, b = m.weight.detach().numpy(), m.bias.detach().numpy()
    xn = x.numpy()
    expected = np.empty_like(xn)
    for n in range(2):
        for h in range(3):
            for ww in range(5):
                v = xn[n, :, h, ww]
                mu = v.sum() / 6
                var = ((v - mu) ** 2).sum() / 6
                expected[n, :, h, ww] = (v - mu) / np.sqrt(var + 1e-5) * w + b
    assert_close(m(x), expected, rtol=1e-10, atol=1e-10)


def test_rmsc_channel_first_vs_float64_definition():
    x = torch.randn(2, 6, 3, 5, dtype=torch.float64) + 1
    m = _randomize(ChannelRMSNorm(6, eps=1e-6).double())
    xn, w = x.numpy(), m.weight.detach().numpy()
    ms = (xn**2).mean(1, keepdims=True)
    assert_close(m(x), xn / np.sqrt(ms + 1e-6) * w[None, :, None, None], rtol=1e-10, atol=1e-10)


def test_ln_and_lnc_differ_on_images():
    # the two layer norms are different things on (N, C, H, W): over (C, H, W) vs over C alone
    x = torch.randn(2, 4, 3, 3) * torch.arange(1.0, 10.0).view(1, 1, 3, 3)
    ln, lnc = normlab.make_norm("ln", 4), normlab.make_norm("lnc", 4)
    y_ln, y_lnc = ln(x), lnc(x)
    assert not torch.allclose(y_ln, y_lnc, atol=1e-2)
    torch.testing.assert_close(y_lnc.mean(1), torch.zeros(2, 3, 3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y_ln.mean((1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", ["lnc", "rmsc"])
@pytest.mark.parametrize("channel_dim", [1, 2, -1])
def test_gradcheck_channel_norms(spec, channel_dim):
    x = torch.randn(2, 3, 4, 3, dtype=torch.float64, requires_grad=True)
    x = x.detach().movedim(1, channel_dim).contiguous().requires_grad_()
    m = _randomize(normlab.make_norm(spec, 3, channel_dim=channel_dim).double())
    assert torch.autograd.gradcheck(m, (x,))
    # channel-last memory takes the native-kernel path: check it too
    if channel_dim == 1:
        xcl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
        assert torch.autograd.gradcheck(m, (xcl,))


# ------------------------------------------------------ registry carries layout
def test_make_norm_gn_with_channel_dim_last():
    m = normlab.make_norm("gn:8", 32, channel_dim=-1)
    assert m.num_groups == 8 and m.channel_dim == -1
    x = torch.randn(2, 5, 5, 32)  # (N, H, W, C)
    ref = nn.GroupNorm(8, 32)
    torch.testing.assert_close(m(x), ref(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------- bad layouts
@pytest.mark.parametrize("spec", SPECS)
def test_wrong_size_along_channel_axis_names_the_axis(spec):
    m = normlab.make_norm(spec, 4, channel_dim=-1)
    with pytest.raises(ValueError) as info:
        m(torch.randn(2, 4, 3, 5))  # NCHW given to a channel-last layer
    msg = str(info.value)
    for w in ("4 channels", "axis 3", "channel_dim=-1", "got 5", "(2, 4, 3, 5)"):
        assert w in msg, (w, msg)


@pytest.mark.parametrize("spec", SPECS)
def test_channel_dim_zero_is_rejected(spec):
    with pytest.raises(ValueError, match="channel_dim"):
        normlab.make_norm(spec, 4, channel_dim=0)


@pytest.mark.parametrize("spec", ["bn", "lnc", "gn:2"])
def test_channel_dim_out_of_range_leaves_running_stats(spec):
    m = normlab.make_norm(spec, 4, channel_dim=-4)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match=r"channel_dim=-4.*rank 3"):
        m(torch.randn(3, 4, 4))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k])
