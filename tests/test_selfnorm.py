"""Self-normalizing networks (Klambauer et al. 2017): the transform, and the fixed point."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

import normlab

ALPHA = 1.6732632423543772848170429916717
LAMBDA = 1.0507009873554804934193349852946


def mlp(depth: int, width: int, dropout: float = 0.0) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers)


def layer_stats(model: nn.Sequential, x: torch.Tensor) -> list[tuple[float, float]]:
    """(mean, variance) of each activation's output, in float64 numpy."""
    stats = []
    h = x
    with torch.no_grad():
        for m in model:
            h = m(h)
            if not isinstance(m, nn.Linear):
                a = h.double().numpy()
                stats.append((float(a.mean()), float(a.var())))
    return stats


def test_transform_swaps_activations_and_dropout_and_reinitializes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3), nn.ReLU(inplace=True), nn.Dropout2d(0.1), nn.Flatten(),
                          nn.Linear(64 * 4 * 4, 512), nn.ReLU(), nn.Dropout(0.05), nn.Linear(512, 10))
    model.eval()
    out = normlab.self_normalizing(model)
    assert out is model
    kinds = [type(m) for m in model]
    assert kinds == [nn.Conv2d, nn.SELU, nn.FeatureAlphaDropout, nn.Flatten, nn.Linear, nn.SELU, nn.AlphaDropout,
                     nn.Linear]
    assert model[1].inplace and model[6].p == 0.05 and model[2].p == 0.1
    assert not any(m.training for m in model.modules())  # modes kept
    for m in (model[0], model[4], model[7]):
        w = m.weight.detach().double().numpy()
        fan_in = w[0].size
        assert abs(w.mean()) < 3 * math.sqrt(1 / fan_in / w.size) + 1e-3
        assert abs(w.var() * fan_in - 1) < 0.1  # N(0, 1/fan_in), not the SELU-gain 3/4 variant
        assert torch.count_nonzero(m.bias) == 0


def test_selu_is_the_papers_function():
    x = torch.linspace(-4, 4, 101, dtype=torch.float64)
    model = normlab.self_normalizing(nn.Sequential(nn.ReLU()))
    ref = np.where(x.numpy() > 0, LAMBDA * x.numpy(), LAMBDA * ALPHA * (np.exp(x.numpy()) - 1))
    np.testing.assert_allclose(model(x).numpy(), ref, rtol=1e-9, atol=1e-12)
    assert isinstance(normlab.self_normalizing(nn.ReLU()), nn.SELU)


def test_32_layer_selu_mlp_keeps_mean_0_var_1_where_relu_does_not():
    torch.manual_seed(0)
    x = torch.randn(512, 128)
    x = (x - x.mean(0)) / x.std(0)  # standardized input, as the paper assumes
    selu = normlab.self_normalizing(mlp(32, 128))
    relu = mlp(32, 128)
    for m in relu.modules():  # the same LeCun-normal init, ReLU kept
        if isinstance(m, nn.Linear):
            normlab.selfnorm.lecun_normal_(m.weight)
            nn.init.zeros_(m.bias)
    s = layer_stats(selu, x)
    assert len(s) == 32
    for mean, var in s[8:]:  # every deep layer stays near the fixed point
        assert abs(mean) < 0.15 and abs(var - 1) < 0.25, (mean, var)
    mean, var = layer_stats(relu, x)[-1]
    assert var < 1e-6  # ReLU halves the second moment per layer: about 2^-32


def test_alpha_dropout_keeps_the_fixed_point_in_training():
    torch.manual_seed(1)
    x = torch.randn(2048, 64)
    model = normlab.self_normalizing(mlp(16, 64, dropout=0.05)).train()
    mean, var = layer_stats(model, x)[-1]
    assert abs(mean) < 0.2 and abs(var - 1) < 0.3


def test_leaves_other_modules_alone():
    model = nn.Sequential(nn.Linear(3, 3, bias=False), nn.Tanh(), nn.BatchNorm1d(3))
    normlab.self_normalizing(model)
    assert [type(m) for m in model] == [nn.Linear, nn.Tanh, nn.BatchNorm1d]


def test_alpha_dropout_is_identity_in_eval():
    model = normlab.self_normalizing(nn.Sequential(nn.Dropout(0.1))).eval()
    x = torch.randn(5, 4)
    torch.testing.assert_close(model(x), x)
