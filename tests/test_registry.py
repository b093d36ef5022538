"""The registry: short specs to layers, overrides, errors, descriptions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab import registry

STANDARD = {
    "bn": normlab.BatchNorm,
    "ln": normlab.LayerNorm,
    "in": normlab.InstanceNorm,
    "gn": normlab.GroupNorm,
    "rms": normlab.RMSNorm,
    "lnc": normlab.ChannelLayerNorm,
    "rmsc": normlab.ChannelRMSNorm,
    "none": nn.Identity,
}


@pytest.mark.parametrize("spec,cls", STANDARD.items())
def test_standard_specs_build_their_layers(spec, cls):
    m = normlab.make_norm(spec, 64)
    assert type(m) is cls
    if cls is not nn.Identity:
        assert m.num_features == 64 and m.channel_dim == 1
        x = torch.randn(2, 64, 3)
        assert m(x).shape == x.shape


def test_defaults_follow_the_papers():
    assert normlab.make_norm("gn", 64).num_groups == 32
    assert normlab.make_norm("gn:16", 64).num_groups == 16
    assert normlab.make_norm("bn", 8).momentum == 0.1 and normlab.make_norm("bn", 8).eps == 1e-5
    assert normlab.make_norm("ln", 8).eps == 1e-5
    assert normlab.make_norm("rms", 8).eps == 1e-6
    inn = normlab.make_norm("in", 8)
    assert inn.affine and not inn.track_running_stats


def test_none_is_identity():
    x = torch.randn(3, 5)
    assert normlab.make_norm("none", 5)(x) is x
    assert normlab.make_norm("none", 5, channel_dim=-1, eps=1e-3)(x) is x  # convert's keywords


def test_spec_is_case_and_space_insensitive():
    assert normlab.make_norm(" GN:4 ", 8).num_groups == 4
    assert isinstance(normlab.make_norm("BN", 8), normlab.BatchNorm)


def test_overrides_reach_the_constructor_and_win_over_the_spec():
    bn = normlab.make_norm("bn", 8, momentum=None, eps=1e-3, affine=False, channel_dim=-1)
    assert bn.momentum is None and bn.eps == 1e-3 and bn.weight is None and bn.channel_dim == -1
    assert normlab.make_norm("gn:8", 32, num_groups=4).num_groups == 4
    gn = normlab.make_norm("gn:8", 32, channel_dim=-1)
    assert gn.num_groups == 8 and gn.channel_dim == -1


def test_unknown_spec_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        normlab.make_norm("batchnorm", 8)
    msg = str(info.value)
    assert "'batchnorm'" in msg
    for name in normlab.available_norms():
        assert name in msg


@pytest.mark.parametrize("spec,words", [
    ("bn:3", "takes no ':' argument"),
    ("lnc:2", "takes no ':' argument"),
    ("gn:x", "num_groups must be int"),
    ("gn:2.5", "num_groups must be int"),
    ("gn:", "no argument"),
    ("", "non-empty string"),
    ("   ", "non-empty string"),
])
def test_bad_specs(spec, words):
    with pytest.raises(ValueError, match=words):
        normlab.make_norm(spec, 8)


def test_non_string_spec():
    with pytest.raises(ValueError, match="non-empty string"):
        normlab.make_norm(None, 8)  # type: ignore[arg-type]


@pytest.mark.parametrize("spec", ["gn:0", "gn:-2", "gn:3", "gn"])
def test_group_count_that_does_not_divide(spec):
    with pytest.raises(ValueError, match=r"GroupNorm\(8\).*num_groups"):
        normlab.make_norm(spec, 8)


def test_available_norms():
    avail = normlab.available_norms()
    assert isinstance(avail, dict)
    assert set(STANDARD) <= set(avail)
    assert list(avail) == sorted(avail)
    for name, desc in avail.items():
        assert isinstance(desc, str) and desc.strip() and "\n" not in desc, name


def test_describe_norms_say_which_axes():
    entries = {e.name: e for e in normlab.describe_norms()}
    assert set(entries) == set(normlab.available_norms())
    for e in entries.values():
        assert e.axes.strip() and e.paper.strip()
    # words a user can check against their shapes
    assert "channel axis alone" in entries["lnc"].axes
    assert "channel axis alone" in entries["rmsc"].axes
    assert "batch" in entries["ln"].axes and "C" in entries["ln"].axes
    assert "per channel" in entries["bn"].axes
    assert entries["bn"].batch_stats and not entries["ln"].batch_stats
    assert entries["gn"].arg == "num_groups"


def test_register_a_new_norm(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))

    @registry.register("scale", description="multiply by a constant", axes="nothing", paper="test",
                       arg="factor", arg_type=float)
    def _scale(num_features, factor=2.0, **kw):
        return nn.Identity() if factor == 1 else nn.Linear(num_features, num_features)

    assert "scale" in normlab.available_norms()
    assert isinstance(normlab.make_norm("scale:1", 3), nn.Identity)
    assert isinstance(normlab.make_norm("scale", 3), nn.Linear)
    with pytest.raises(ValueError, match="factor must be float"):
        normlab.make_norm("scale:abc", 3)
    with pytest.raises(ValueError, match="already registered"):
        registry.register("scale", description="x", axes="x", paper="x")(_scale)
