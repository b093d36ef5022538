"""Generalized Hamming layers (Fan 2017) against -GHD(x, w)/L computed in float64 from the
fuzzy XOR a (+) b = a + b - 2ab, element by element."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from normlab import GeneralizedHammingConv2d, GeneralizedHammingLinear


def neg_ghd(x: np.ndarray, w: np.ndarray) -> float:
    """-GHD(x, w) / L for two flat vectors of length L."""
    x, w = np.asarray(x, np.float64).ravel(), np.asarray(w, np.float64).ravel()
    return -float(np.sum(x + w - 2 * x * w)) / x.size


def ref_linear(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    lead = x.shape[:-1]
    flat = x.reshape(-1, x.shape[-1])
    out = np.array([[neg_ghd(xi, wj) for wj in w] for xi in flat])
    return out.reshape(*lead, w.shape[0])


def test_linear_equals_negative_normalized_ghd():
    layer = GeneralizedHammingLinear(7, 4)
    x = torch.rand(3, 5, 7)  # fuzzy-logic inputs in [0, 1]; any real values work too
    y = layer(x)
    assert y.shape == (3, 5, 4)
    np.testing.assert_allclose(y.detach().numpy(), ref_linear(x.numpy(), layer.weight.detach().numpy()), atol=1e-6)
    x = torch.randn(6, 7, dtype=torch.float64) * 3
    np.testing.assert_allclose(layer.double()(x).detach().numpy(),
                               ref_linear(x.numpy(), layer.weight.detach().numpy()), atol=1e-12)


@pytest.mark.parametrize("stride, padding, dilation", [(1, 0, 1), (2, 1, 1), (1, 2, 2)])
def test_conv_equals_negative_normalized_ghd_per_receptive_field(stride, padding, dilation):
    layer = GeneralizedHammingConv2d(3, 4, (3, 2), stride=stride, padding=padding, dilation=dilation).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    y = layer(x)
    w = layer.weight.detach().numpy()
    ref = ref_conv_rect(x.numpy(), w, stride, padding, dilation)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y.detach().numpy(), ref, atol=1e-12)
    # unbatched input
    np.testing.assert_allclose(layer(x[0]).detach().numpy(), ref[0], atol=1e-12)


def ref_conv_rect(x, w, stride, padding, dilation):
    n, c, h, wd = x.shape
    co, _, kh, kw = w.shape
    xp = np.zeros((n, c, h + 2 * padding, wd + 2 * padding))
    xp[:, :, padding:padding + h, padding:padding + wd] = x
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, co, ho, wo))
    for b in range(n):
        for o in range(co):
            for i in range(ho):
                for j in range(wo):
                    r0, c0 = i * stride, j * stride
                    patch = xp[b, :, r0:r0 + dilation * (kh - 1) + 1:dilation, c0:c0 + dilation * (kw - 1) + 1:dilation]
                    out[b, o, i, j] = neg_ghd(patch, w[o])
    return out


def test_square_kernel_reference_agrees():
    layer = GeneralizedHammingConv2d(2, 3, 3, padding=1).double()
    x = torch.rand(1, 2, 5, 5, dtype=torch.float64)
    np.testing.assert_allclose(layer(x).detach().numpy(), ref_conv_rect(x.numpy(), layer.weight.detach().numpy(), 1, 1, 1),
                               atol=1e-12)


def test_no_bias_no_statistics_train_equals_eval():
    for layer, x in ((GeneralizedHammingLinear(5, 3), torch.randn(4, 5)),
                     (GeneralizedHammingConv2d(2, 3, 3), torch.randn(4, 2, 6, 6))):
        assert [n for n, _ in layer.named_parameters()] == ["weight"]
        assert list(layer.buffers()) == []
        layer.train()
        a = layer(x)
        layer.eval()
        torch.testing.assert_close(layer(x), a, rtol=0, atol=0)
        # each sample alone gives the same answer: no batch statistics
        torch.testing.assert_close(layer(x[:1]), a[:1])


def test_gradcheck():
    lin = GeneralizedHammingLinear(4, 3).double()
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(lin, {"weight": w}, (x,)),
                                    (x, lin.weight.detach().clone().requires_grad_()))
    conv = GeneralizedHammingConv2d(2, 2, 2, stride=1, padding=1).double()
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w: torch.func.functional_call(conv, {"weight": w}, (x,)),
                                    (x, conv.weight.detach().clone().requires_grad_()))


def test_state_dict_round_trip():
    a, b = GeneralizedHammingConv2d(2, 3, 3), GeneralizedHammingConv2d(2, 3, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 2, 5, 5)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_bad_inputs():
    with pytest.raises(ValueError, match=r"GeneralizedHammingLinear\(5, 3\).*\(\.\.\., 5\)"):
        GeneralizedHammingLinear(5, 3)(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"GeneralizedHammingConv2d\(2, 3\).*\(N, 2, H, W\)"):
        GeneralizedHammingConv2d(2, 3, 3)(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="GeneralizedHammingConv2d"):
        GeneralizedHammingConv2d(2, 3, 3)(torch.randn(2, 5))
    with pytest.raises(TypeError, match="floating-point"):
        GeneralizedHammingLinear(2, 3)(torch.ones(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="positive"):
        GeneralizedHammingLinear(0, 3)
