"""Whole-model tools: convert, fold_batchnorm, recalibrate."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import BatchNorm, GroupNorm


class BasicBlock(nn.Module):
    """torchvision's ResNet BasicBlock, written out: conv-bn-relu-conv-bn + shortcut, relu."""

    def __init__(self, cin: int, cout: int, stride: int = 1, norm=nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


def _tiny_resnet(norm=nn.BatchNorm2d) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), norm(8), nn.ReLU(),
        BasicBlock(8, 8, norm=norm), BasicBlock(8, 16, stride=2, norm=norm),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    )


def _train_step(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = nn.functional.cross_entropy(model(x), target)
    opt.zero_grad()
    loss.backward()
    opt.step()
    with torch.no_grad():
        after = nn.functional.cross_entropy(model(x), target)
    return loss.item(), after.item()


# ------------------------------------------------------------------- convert
def test_resnet_block_converts_to_gn4_and_trains():
    model = _tiny_resnet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    old = {n: (m.weight.clone(), m.bias.clone()) for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    out = normlab.convert(model, "gn:4")
    assert out is model
    new = {n: m for n, m in model.named_modules() if isinstance(m, GroupNorm)}
    assert set(new) == set(old) and len(new) == 6  # stem, 2 + 2 in blocks, 1 in the shortcut
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    for n, m in new.items():
        assert m.num_groups == 4 and m.num_features == old[n][0].numel()
        torch.testing.assert_close(m.weight.data, old[n][0])  # affine parameters kept
        torch.testing.assert_close(m.bias.data, old[n][1])
    x, y = torch.randn(8, 3, 12, 12), torch.randint(0, 4, (8,))
    before, after = _train_step(model, x, y)
    assert np.isfinite(before) and np.isfinite(after) and after < before
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


TORCH_NORMS = [
    (lambda: nn.BatchNorm1d(6, eps=1e-3), (4, 6, 5), 1, 1e-3),
    (lambda: nn.BatchNorm2d(6, eps=2e-3), (4, 6, 3, 3), 1, 2e-3),
    (lambda: nn.BatchNorm3d(6), (4, 6, 2, 2, 2), 1, 1e-5),
    (lambda: nn.SyncBatchNorm(6, eps=3e-3), (4, 6, 3, 3), 1, 3e-3),
    (lambda: nn.GroupNorm(3, 6, eps=4e-3), (4, 6, 3, 3), 1, 4e-3),
    (lambda: nn.InstanceNorm1d(6, eps=5e-3, affine=True), (4, 6, 5), 1, 5e-3),
    (lambda: nn.InstanceNorm2d(6, eps=6e-3), (4, 6, 3, 3), 1, 6e-3),
    (lambda: nn.InstanceNorm3d(6), (4, 6, 2, 2, 2), 1, 1e-5),
    (lambda: nn.LayerNorm(6, eps=7e-3), (4, 5, 6), -1, 7e-3),
    (lambda: nn.RMSNorm(6, eps=8e-3), (4, 5, 6), -1, 8e-3),
    (lambda: nn.RMSNorm(6), (4, 5, 6), -1, None),
    (lambda: BatchNorm(6, eps=9e-3), (4, 6, 3), 1, 9e-3),
    (lambda: normlab.ChannelLayerNorm(6, channel_dim=-1), (4, 5, 6), -1, 1e-5),
]


@pytest.mark.parametrize("make,shape,channel_dim,eps", TORCH_NORMS)
@pytest.mark.parametrize("spec", ["bn", "ln", "gn:2", "rms", "lnc", "rmsc", "in"])
def test_every_norm_type_maps(make, shape, channel_dim, eps, spec):
    model = nn.Sequential(nn.Identity(), make())
    normlab.convert(model, spec)
    new = model[1]
    assert type(new) is type(normlab.make_norm(spec, 6))
    assert new.num_features == 6 and new.channel_dim == channel_dim
    if eps is not None:
        assert new.eps == eps
    elif spec in ("rms", "rmsc"):
        assert new.eps is None  # torch.nn.RMSNorm's default: the dtype's machine epsilon
    else:
        assert new.eps == normlab.make_norm(spec, 6).eps
    assert model(torch.randn(*shape)).shape == shape


def test_lnc_conversion_of_torch_layernorm_is_exact_and_rms_eps_none_carried():
    x = torch.randn(3, 5, 6)
    for old, spec in ((nn.LayerNorm(6, eps=1e-3), "lnc"), (nn.RMSNorm(6), "rmsc")):
        with torch.no_grad():
            old.weight.uniform_(0.5, 1.5)
        y = old(x)
        new = normlab.convert(old, spec)  # a norm itself: the new layer comes back
        assert new is not old
        torch.testing.assert_close(new(x), y)


def test_running_stats_device_dtype_mode_carried():
    bn = nn.BatchNorm2d(4).double()
    for _ in range(3):
        bn(torch.randn(8, 4, 3, 3, dtype=torch.float64) * 2 + 1)
    bn.eval()
    model = nn.Sequential(bn)
    normlab.convert(model, "bn")
    new = model[0]
    assert isinstance(new, BatchNorm) and not new.training
    assert new.running_mean.dtype == torch.float64 and new.weight.dtype == torch.float64
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(new, k), getattr(bn, k))
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(new(x), bn(x))


def test_copy_affine_false_gives_fresh_parameters():
    old = nn.GroupNorm(2, 4)
    with torch.no_grad():
        old.weight.fill_(3.0)
    new = normlab.convert(nn.Sequential(old), "ln", copy_affine=False)[0]
    assert torch.all(new.weight == 1) and torch.all(new.bias == 0)
    new = normlab.convert(nn.Sequential(old), "ln")[0]
    assert torch.all(new.weight == 3)


def test_layernorm_over_two_trailing_dims_is_left_in_place_with_a_warning():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.LayerNorm((3, 4))), nn.BatchNorm1d(3))
    with pytest.warns(UserWarning, match=r"left 1\.0 .*LayerNorm\(\(3, 4\).*in place"):
        normlab.convert(model, "gn:1")
    assert isinstance(model[1][0], nn.LayerNorm)  # untouched
    assert isinstance(model[2], GroupNorm)  # the others still converted


def test_unknown_spec_touches_nothing():
    model = _tiny_resnet()
    with pytest.raises(ValueError, match="unknown norm"):
        normlab.convert(model, "nope")
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 6


def test_convert_to_none_removes_norms():
    model = normlab.convert(_tiny_resnet(), "none")
    assert not any(isinstance(m, (nn.BatchNorm2d, normlab.Norm)) for m in model.modules())
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def _encoder(dropout: float = 0.0, norm_first: bool = True) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=dropout, batch_first=True, norm_first=norm_first)
    return nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(16), enable_nested_tensor=False)


@pytest.mark.parametrize("spec,cls", [("rmsc", normlab.ChannelRMSNorm), ("bn", BatchNorm), ("lnc", normlab.ChannelLayerNorm)])
def test_transformer_encoder_converts_and_trains(spec, cls):
    enc = _encoder(dropout=0.1)
    normlab.convert(enc, spec)
    norms = [m for m in enc.modules() if isinstance(m, normlab.Norm)]
    assert len(norms) == 5 and all(type(m) is cls and m.channel_dim == -1 for m in norms)
    assert not any(isinstance(m, nn.LayerNorm) for m in enc.modules())
    head = nn.Linear(16, 1)
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=1e-3)
    x, y = torch.randn(4, 7, 16), torch.randn(4, 7, 1)
    loss = nn.functional.mse_loss(head(enc(x)), y)
    opt.zero_grad()
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p).all() for p in enc.parameters())
    if spec == "bn":  # batch norm over (N, L) per channel: running stats moved
        assert int(norms[0].num_batches_tracked) == 1 and not torch.all(norms[0].running_mean == 0)


@pytest.mark.parametrize("norm_first", [True, False])
def test_converted_transformer_uses_its_norms_in_inference(norm_first):
    # torch's inference fast path applies a fused layer norm with norm1.weight/bias and
    # never calls norm1; after convert the new norms must really run
    enc = _encoder(norm_first=norm_first).eval()
    x = torch.randn(3, 5, 16)
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 3:] = True
    with torch.no_grad():
        y_ln = enc(x, src_key_padding_mask=mask)
    lnc = normlab.convert(copy.deepcopy(enc), "lnc")
    with torch.no_grad():
        torch.testing.assert_close(lnc(x, src_key_padding_mask=mask)[~mask], y_ln[~mask], rtol=1e-5, atol=1e-5)
    for spec in ("bn", "rmsc"):
        conv = normlab.convert(copy.deepcopy(enc), spec).eval()
        with torch.no_grad():
            y_nograd = conv(x)
        y_grad = conv(x)  # autograd on: the slow path, which calls every module
        torch.testing.assert_close(y_nograd, y_grad.detach(), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(y_nograd, enc(x).detach(), atol=1e-3)


# ------------------------------------------------------------------- folding
def _trained_bn(bn: nn.Module, c: int) -> nn.Module:
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c))
        bn.running_var.copy_(torch.rand(c) + 0.5)
        if bn.weight is not None:
            bn.weight.uniform_(0.5, 2.0)
            bn.bias.uniform_(-1, 1)
    return bn


FOLD_CASES = [
    (lambda b: nn.Conv1d(3, 5, 3, bias=b), (2, 3, 9)),
    (lambda b: nn.Conv2d(3, 5, 3, bias=b), (2, 3, 7, 7)),
    (lambda b: nn.Conv2d(4, 6, 3, bias=b, groups=2), (2, 4, 7, 7)),
    (lambda b: nn.Conv3d(3, 5, 2, bias=b), (2, 3, 4, 4, 4)),
    (lambda b: nn.Linear(3, 5, bias=b), (6, 3)),
]


@pytest.mark.parametrize("make,shape", FOLD_CASES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("ours", [True, False])
def test_fold_batchnorm(make, shape, bias, ours):
    layer = make(bias)
    c = layer.weight.shape[0]
    bn = _trained_bn(BatchNorm(c) if ours else (nn.BatchNorm1d(c) if isinstance(layer, nn.Linear) else
                                                 {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](c)), c)
    model = nn.Sequential(layer, bn, nn.ReLU()).eval()
    x = torch.randn(*shape)
    y = model(x)
    normlab.fold_batchnorm(model)
    assert isinstance(model[1], nn.Identity) and model[0].bias is not None
    torch.testing.assert_close(model(x), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, BatchNorm])
def test_fold_residual_block(norm):
    block = BasicBlock(4, 8, stride=2, norm=norm)
    for m in block.modules():
        if isinstance(m, (nn.BatchNorm2d, BatchNorm)):
            _trained_bn(m, 8)
    block.eval()
    x = torch.randn(2, 4, 8, 8)
    y = block(x)
    normlab.fold_batchnorm(block)
    assert not any(isinstance(m, (nn.BatchNorm2d, BatchNorm)) for m in block.modules())
    torch.testing.assert_close(block(x), y, rtol=1e-5, atol=1e-5 * y.abs().max().item())


def test_fold_leaves_what_it_cannot_fold():
    class TwoUsers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = _trained_bn(nn.BatchNorm2d(4), 4)

        def forward(self, x):
            h = self.conv(x)
            return self.bn(h) + h  # the conv output is used twice: folding would change it

    model = TwoUsers().eval()
    x = torch.randn(2, 3, 6, 6)
    y = model(x)
    normlab.fold_batchnorm(model)
    assert isinstance(model.bn, nn.BatchNorm2d)
    torch.testing.assert_close(model(x), y)
    # a norm without running statistics and a norm after a non-foldable layer stay too
    seq = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False),
                        nn.ConvTranspose2d(4, 4, 3), _trained_bn(nn.BatchNorm2d(4), 4)).eval()
    normlab.fold_batchnorm(seq)
    assert isinstance(seq[1], nn.BatchNorm2d) and isinstance(seq[3], nn.BatchNorm2d)


def test_fold_needs_eval():
    with pytest.raises(ValueError, match="eval"):
        normlab.fold_batchnorm(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)))


# --------------------------------------------------------------- recalibrate
class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn0 = BatchNorm(3, momentum=0.3)
        self.conv = nn.Conv2d(3, 4, 3)
        self.drop = nn.Dropout(0.5)
        self.bn1 = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn1(self.drop(self.conv(self.bn0(x))))


def test_recalibrate_is_the_exact_average_and_restores_modes():
    net = _Net()
    net.train()
    net.drop.eval()  # a mixed set of modes must come back as it was
    for _ in range(3):
        net(torch.randn(4, 3, 6, 6) * 5 + 3)
    seen = {"bn0": [], "bn1": []}
    hooks = [getattr(net, k).register_forward_pre_hook(lambda m, a, k=k: seen[k].append(a[0].detach().double()))
             for k in seen]
    batches = [(torch.randn(n, 3, 6, 6) * s + s, torch.zeros(n)) for n, s in ((4, 1.0), (6, 2.0), (3, 0.5))]
    normlab.recalibrate(net, batches)
    for h in hooks:
        h.remove()
    for k, inputs in seen.items():
        assert len(inputs) == 3
        bn = getattr(net, k)
        means = [t.mean((0, 2, 3)) for t in inputs]
        variances = [t.transpose(0, 1).reshape(t.shape[1], -1).var(1, unbiased=True) for t in inputs]
        torch.testing.assert_close(bn.running_mean.double(), torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), torch.stack(variances).mean(0), rtol=1e-5, atol=1e-6)
        assert int(bn.num_batches_tracked) == 3
    # dropout stayed off while recalibrating: bn1 saw deterministic inputs
    with torch.no_grad():
        bn0_out = nn.functional.batch_norm(batches[0][0], None, None, net.bn0.weight, net.bn0.bias, training=True)
        again = net.conv(bn0_out).double()
    assert net.bn0.momentum == 0.3 and net.bn1.momentum == 0.1
    assert net.training and net.bn0.training and net.bn1.training and not net.drop.training
    torch.testing.assert_close(seen["bn1"][0], again, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batches", [[], iter(())])
def test_recalibrate_empty_raises_and_leaves_stats(batches):
    net = _Net()
    net(torch.randn(4, 3, 6, 6))
    net.eval()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="no batches"):
        normlab.recalibrate(net, batches)
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert not net.training and not net.bn0.training and net.bn0.momentum == 0.3


def test_recalibrate_failing_batch_restores_stats():
    net = _Net()
    net(torch.randn(4, 3, 6, 6))
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="channels"):
        normlab.recalibrate(net, [torch.randn(2, 3, 6, 6), torch.randn(2, 5, 6, 6)])
    for k, v in net.state_dict().items():
        torch.testing.assert_close(v, before[k])
    assert net.bn1.momentum == 0.1 and net.training


def test_no_warnings_on_a_plain_conversion():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        normlab.convert(_tiny_resnet(), "bn")
