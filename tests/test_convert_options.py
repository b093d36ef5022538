"""convert carries every option, is all or nothing, recognises norms by behaviour, and
inspect says what it found; torch's layers (and norms written out as other libraries write
them) are the references."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import normlab
from _helpers import norm_and_activation, randomize_affine


def _same_kind(old: nn.Module, spec: str, shape: tuple[int, ...], dtype=torch.float64) -> None:
    """``convert(old, spec)`` computes what ``old`` does: outputs, input and parameter
    gradients, running statistics over 3 training steps (one SGD step between), then eval."""
    old = randomize_affine(old).to(dtype)
    new = normlab.convert(copy.deepcopy(old), spec)
    assert new is not old and isinstance(new, normlab.Norm)
    pa = [p for p in old.parameters()]
    pb = [p for p in new.parameters()]
    assert [(p.shape, p.dtype, p.requires_grad) for p in pa] == [(p.shape, p.dtype, p.requires_grad) for p in pb]
    oa, ob = torch.optim.SGD(pa or [nn.Parameter(torch.zeros(1))], lr=0.1), torch.optim.SGD(
        pb or [nn.Parameter(torch.zeros(1))], lr=0.1)
    for step in range(3):
        x = (torch.randn(*shape, dtype=dtype) * (2 + step) + step).requires_grad_()
        xb = x.detach().clone().requires_grad_()
        ya, yb = old(x), new(xb)
        torch.testing.assert_close(yb, ya)
        g = torch.randn_like(ya)
        ya.backward(g), yb.backward(g)
        torch.testing.assert_close(xb.grad, x.grad)
        for p, q in zip(pa, pb):
            if p.requires_grad:
                torch.testing.assert_close(q.grad, p.grad)
        oa.step(), ob.step()
        for k, v in old.state_dict().items():
            if k == "num_batches_tracked" and isinstance(old, nn.modules.instancenorm._InstanceNorm):
                continue  # torch's InstanceNorm*d never counts (a listed difference)
            torch.testing.assert_close(new.state_dict()[k], v, msg=k)
    old.eval(), new.eval()
    x = torch.randn(*shape, dtype=dtype) * 3 + 1
    torch.testing.assert_close(new(x), old(x))


def _frozen_weight(m: nn.Module) -> nn.Module:
    m.weight.requires_grad_(False)
    return m


SAME_KIND = [
    (lambda: nn.BatchNorm2d(6, momentum=0.01, eps=1e-3), "bn", (4, 6, 3, 3)),  # MobileNetV3's
    (lambda: nn.BatchNorm1d(6, momentum=None), "bn", (8, 6)),  # the cumulative average
    (lambda: nn.BatchNorm2d(6, track_running_stats=False), "bn", (4, 6, 3, 3)),
    (lambda: nn.BatchNorm3d(6, affine=False), "bn", (3, 6, 2, 2, 2)),
    (lambda: _frozen_weight(nn.BatchNorm2d(6, momentum=0.3)), "bn", (4, 6, 3, 3)),
    (lambda: nn.SyncBatchNorm(6, momentum=0.05), "bn", (4, 6, 3, 3)),
    (lambda: nn.InstanceNorm2d(6, affine=True, track_running_stats=True, momentum=0.2), "in", (4, 6, 3, 3)),
    (lambda: nn.InstanceNorm1d(6), "in", (4, 6, 5)),
    (lambda: nn.GroupNorm(3, 6, eps=1e-3), "gn:3", (4, 6, 3, 3)),
    (lambda: nn.GroupNorm(2, 6, bias=False), "gn:2", (4, 6, 5)),
    (lambda: nn.LayerNorm(6, bias=False), "lnc", (4, 5, 6)),
    (lambda: nn.LayerNorm(6, elementwise_affine=False), "lnc", (4, 5, 6)),
    (lambda: nn.RMSNorm(6), "rmsc", (4, 5, 6)),
    (lambda: nn.RMSNorm(6, eps=1e-3, elementwise_affine=False), "rmsc", (4, 5, 6)),
    (lambda: normlab.BatchRenorm(6, momentum=0.2, warmup_steps=0, ramp_steps=0), "brn", (4, 6, 3)),
    (lambda: normlab.BatchNorm(6, momentum=None, channel_dim=-1), "bn", (4, 3, 6)),
]


@pytest.mark.parametrize("make,spec,shape", SAME_KIND)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_same_kind_conversion_changes_nothing(make, spec, shape, dtype):
    _same_kind(make(), spec, shape, dtype)


def test_options_carried_to_another_kind():
    bn = nn.BatchNorm2d(8, momentum=0.01, eps=1e-3, affine=False, track_running_stats=False)
    new = normlab.convert(bn, "sn")
    assert (new.momentum, new.eps, new.affine, new.track_running_stats) == (0.01, 1e-3, False, False)
    assert new.weight is None and new.running_mean is None
    # running statistics mean nothing to a norm of another family: not carried there
    inn = normlab.convert(nn.BatchNorm2d(8, momentum=0.01), "in")
    assert inn.momentum == 0.1 and not inn.track_running_stats
    ln = normlab.convert(nn.LayerNorm(8, bias=False), "gn:4", )
    assert ln.bias is None and ln.weight is not None and "bias=False" in repr(ln)


def test_device_dtype_mode_and_requires_grad_carried():
    model = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6, elementwise_affine=False), nn.BatchNorm1d(6)).double()
    model[2].bias.requires_grad_(False)
    model[2].eval()
    normlab.convert(model, "bn")
    ln, bn = model[1], model[2]
    assert ln.weight is None and ln.running_mean.dtype == torch.float64  # no state: the model's dtype
    assert bn.weight.dtype == torch.float64 and not bn.bias.requires_grad and bn.weight.requires_grad
    assert ln.training and not bn.training
    assert model(torch.randn(3, 4, dtype=torch.float64)).dtype == torch.float64
    # the reported bug: float64 LayerNorm without affine to lnc kept no float32 parameters
    m = nn.Sequential(nn.LayerNorm(6, elementwise_affine=False)).double()
    normlab.convert(m, "lnc")
    assert m[0].weight is None
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    torch.testing.assert_close(m(x), nn.functional.layer_norm(x, (6,)))


def test_all_or_nothing_names_every_failing_module():
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16),
                          nn.Sequential(nn.Flatten(), nn.Linear(16, 10), nn.BatchNorm1d(10)), nn.GroupNorm(2, 6))
    before = copy.deepcopy(model.state_dict())
    types = [type(m) for m in model.modules()]
    with pytest.raises(ValueError) as info:
        normlab.convert(model, "gn:8")
    msg = str(info.value)
    assert "2.2 (BatchNorm1d, 10 channels)" in msg and "3 (GroupNorm, 6 channels)" in msg
    assert "divisor of the 10 channels" in msg and "unchanged" in msg
    assert "1 (" not in msg.replace("2.1", "")  # the BatchNorm2d(16) converts, so it is not named
    assert [type(m) for m in model.modules()] == types
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, before[k])


def test_groupnorm_with_one_value_per_group_raises_like_torch():
    ours, ref = normlab.GroupNorm(4, num_groups=4), nn.GroupNorm(4, 4)
    for shape in [(1, 4), (1, 4, 1), (1, 8, 1)]:
        for layer in (ours, ref):
            if shape[1] != 4:
                layer = normlab.GroupNorm(8, num_groups=8) if layer is ours else nn.GroupNorm(8, 8)
            for training in (True, False):
                layer.train(training)
                with pytest.raises(ValueError, match=r"more than 1 value|more than one value per group"):
                    layer(torch.randn(*shape))
    x = torch.randn(2, 4)  # two samples: torch computes (each group is one value), so do we
    torch.testing.assert_close(ours(x), ref(x))


def test_lazy_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 5, 1), nn.LazyBatchNorm2d(momentum=0.05))
    with pytest.warns(UserWarning, match=r"left 1 .*lazy batch norm not yet initialized"):
        normlab.convert(model, "bn")
    assert isinstance(model[1], nn.LazyBatchNorm2d)
    model(torch.randn(4, 3, 2, 2))
    normlab.convert(model, "bn")
    assert isinstance(model[1], normlab.BatchNorm) and model[1].momentum == 0.05 and model[1].num_features == 5


class LayerNorm2d(nn.LayerNorm):
    """ConvNeXt's channel-first layer norm, as timm and the ConvNeXt code write it."""

    def forward(self, x):
        x = x.permute(0, 2, 3, 1)
        x = nn.functional.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class LlamaRMSNorm(nn.Module):
    """Hugging Face's (transformers/models/llama/modeling_llama.py)."""

    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states):
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class GemmaRMSNorm(nn.Module):
    """Gemma's: the scale is 1 + weight, which no spec computes."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        out = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * (1.0 + self.weight.float())).type_as(x)


class BatchNormAct(nn.BatchNorm2d):
    def __init__(self, c):
        super().__init__(c)
        self.drop = nn.Identity()
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.drop(super().forward(x)))


def test_recognised_by_behaviour():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), LayerNorm2d(8, eps=1e-6), BatchNormAct(8))
    rows = normlab.inspect(model)
    assert [(r.path, r.kind, r.layout, r.num_features) for r in rows] == [
        ("1", "lnc", "(N, C, *)", 8), ("2", "bn", "(N, C, *)", 8)]
    assert "SiLU" in rows[1].action
    x = torch.randn(2, 3, 4, 4)
    ref = copy.deepcopy(model)
    normlab.convert(model, "lnc")  # the reported bug: channel_dim=-1 raised on the first forward
    assert model[1].channel_dim == 1 and model[1].eps == 1e-6
    assert norm_and_activation(model[2])[1] == "silu"  # the activation kept (fused into the new norm)
    model.eval(), ref.eval()
    torch.testing.assert_close(model[:2](x), ref[:2](x))
    normlab.convert(ref, "gn:4")
    h = ref[1](ref[0](x))
    torch.testing.assert_close(ref[2](h), nn.functional.silu(nn.functional.group_norm(h, 4, eps=1e-5)))


def test_hugging_face_rms_norm_converts_and_gemma_is_left_with_one_warning():
    model = nn.Sequential(nn.Linear(4, 6), LlamaRMSNorm(6, eps=1e-5), nn.Linear(6, 6), GemmaRMSNorm(6),
                          nn.LayerNorm((2, 3)))
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    x = torch.randn(3, 4)
    with torch.no_grad():
        y = model[1](model[0](x))
    rows = {r.path: r for r in normlab.inspect(model, "rmsc")}
    assert rows["1"].kind == "rmsc" and rows["1"].layout == "channel_dim=-1" and "ChannelRMSNorm" in rows["1"].action
    assert rows["3"].action.startswith("left in place") and rows["4"].action.startswith("left in place")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        normlab.convert(model, "rmsc")
    assert len(got) == 1 and "left 3 (GemmaRMSNorm" in str(got[0].message) and "left 4 (LayerNorm" in str(got[0].message)
    assert isinstance(model[1], normlab.ChannelRMSNorm) and model[1].eps == 1e-5
    assert isinstance(model[3], GemmaRMSNorm) and isinstance(model[4], nn.LayerNorm)
    with torch.no_grad():
        torch.testing.assert_close(model[1](model[0](x)), y)


def test_inspect_reports_and_changes_nothing():
    model = nn.Sequential(nn.Conv2d(3, 10, 1), nn.BatchNorm2d(10, momentum=0.01), nn.GroupNorm(2, 4))
    rows = normlab.inspect(model, "gn:8")
    assert [r.path for r in rows] == ["1", "2"]
    assert rows[0].type == "torch.nn.modules.batchnorm.BatchNorm2d" and rows[0].num_features == 10
    assert rows[0].action.startswith("error:") and "divisor" in rows[0].action
    assert rows[1].kind == "gn:2" and rows[1].action.startswith("error:")
    assert "momentum=0.01" in normlab.inspect(model)[0].action
    assert isinstance(model[1], nn.BatchNorm2d) and "1  torch.nn" in str(rows[0])
    assert normlab.inspect(nn.Sequential(nn.Linear(2, 2))) == []


def test_shared_norm_converted_once_everywhere():
    bn = nn.BatchNorm1d(4)
    model = nn.Sequential(nn.Linear(4, 4), bn, nn.Linear(4, 4), bn)
    normlab.convert(model, "bn")
    assert model[1] is model[3] and isinstance(model[1], normlab.BatchNorm)


def test_convert_sees_through_normact():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct(8))
    normlab.convert(model, "gn:4")
    normlab.convert(model, "bn")  # GroupNorm + silu -> BatchNorm + silu, not nested
    norm, act = norm_and_activation(model[1])
    assert type(norm) is normlab.BatchNorm and act == "silu" and not isinstance(getattr(norm, "act", None), normlab.NormAct)


def test_convert_sync_keeps_the_activation_of_a_batchnorm_act():
    model = nn.Sequential(nn.Conv2d(3, 8, 1), BatchNormAct(8))
    normlab.convert_sync(model)
    norm, act = norm_and_activation(model[1])
    assert act == "silu" and norm.process_group is not None
