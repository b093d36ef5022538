"""Half precision (bfloat16, float16) on the compiled kernels: every layer's fast path equals
the plain autograd path run on the same half input (outputs, input and parameter gradients,
running statistics), its output and gradient keep the input's dtype and memory format, it
saves one input-sized tensor for backward, and under ``torch.autocast("cpu")`` the layers
give the dtype torch's own layers give."""

from __future__ import annotations

import pytest
import torch

import normlab
from normlab import _kernels
from normlab.bench import saved_bytes
from normlab.functional import fast_path

CL = torch.channels_last
HALF = (torch.bfloat16, torch.float16)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not _kernels.available(), reason=_kernels.status())]

# name -> (layer factory for C channels, channel_dim)
LAYERS = {
    "bn": lambda c: normlab.BatchNorm(c),
    "ln": lambda c: normlab.LayerNorm(c),
    "in": lambda c: normlab.InstanceNorm(c, affine=True, track_running_stats=True),
    "gn": lambda c: normlab.GroupNorm(c, num_groups=2),
    "rms": lambda c: normlab.RMSNorm(c),
    "brn": lambda c: normlab.BatchRenorm(c, r_max=1.5, d_max=0.5),
    "bin": lambda c: normlab.BatchInstanceNorm(c),
    "sn": lambda c: normlab.SwitchableNorm(c),
    "mobn": lambda c: normlab.MeanOnlyBatchNorm(c),
    "pn": lambda c: normlab.PowerNorm(c),
    "evos0": lambda c: normlab.EvoNormS0(c, num_groups=2),
    "evob0": lambda c: normlab.EvoNormB0(c),
}


def _layer(name: str, c: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = LAYERS[name](c)
    with torch.no_grad():  # parameters away from their initial values, so every gradient matters
        for p in m.parameters():
            p.add_(torch.rand_like(p) * 0.5)
    return m


def _input(layout: str, dtype: torch.dtype, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 6, 9, 11, generator=g) * 1.5 + 0.7
    return (x.contiguous(memory_format=CL) if layout == "cl" else x).to(dtype)


def _step(m: torch.nn.Module, x: torch.Tensor, dy: torch.Tensor, enabled: bool):
    xx = x.detach().clone().requires_grad_()
    with fast_path(enabled):
        y = m(xx)
        (y.float() * dy.float()).sum().backward()
    grads = [p.grad.clone() for p in m.parameters()]
    return y, xx.grad, grads, [b.clone() for b in m.buffers()]


def _close(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    # both paths compute in float32 and round once to the half type at the end: they differ by
    # at most a unit or two in the last place of the half result
    tol = {torch.bfloat16: 2e-2, torch.float16: 4e-3}[dtype]
    torch.testing.assert_close(a.float(), b.float(), rtol=tol, atol=tol * max(1.0, b.float().abs().max().item()),
                               msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("layout", ["cf", "cl"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_half_fast_path_equals_plain_path(name, layout, dtype):
    x = _input(layout, dtype)
    dy = torch.randn(x.shape).to(dtype)
    fast = _step(_layer(name, 6), x, dy, True)
    plain = _step(_layer(name, 6), x, dy, False)
    y, dx, grads, bufs = fast
    assert y.dtype == dtype and dx.dtype == dtype
    if layout == "cl":
        assert y.is_contiguous(memory_format=CL) and dx.is_contiguous(memory_format=CL)
    _close(y, plain[0], dtype, "output")
    _close(dx, plain[1], dtype, "input gradient")
    for a, b in zip(grads, plain[2]):
        assert a.dtype == b.dtype == torch.float32
        _close(a, b, dtype, "parameter gradient")
    for i, (a, b) in enumerate(zip(bufs, plain[3])):
        if name == "pn" and i == 1:  # its nu (ema_gz), from the backward's half-precision products
            _close(a, b, dtype, "ema_gz")
        else:  # running statistics: float32 from float32 moments
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["bn", "ln", "in", "gn", "rms", "brn", "bin", "sn", "mobn", "pn", "evos0", "evob0"])
def test_half_eval_fast_path_equals_plain_path(name, dtype):
    x = _input("cf", dtype)
    m = _layer(name, 6)
    with torch.no_grad(), fast_path(False):
        m(x.float())  # running statistics from one training step
    m.eval()
    with torch.no_grad():
        with fast_path(True):
            y = m(x)
        with fast_path(False):
            ref = m(x)
    assert y.dtype == dtype
    _close(y, ref, dtype, "eval output")


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["gn", "bn"])
def test_half_kernels_match_a_float64_reference_at_large_mean(name, dtype):
    """Half values (exact in float64) whose mean is 1e3 x their spread: the kernels' moments
    are those of the same values in float64, so the output is the float64 result rounded once."""
    g = torch.Generator().manual_seed(3)
    spread = 8.0 if dtype == torch.bfloat16 else 1.0  # (bfloat16 has 8 bits: spacing 8 at 1e3 x 8)
    x = (torch.randn(4, 6, 32, 32, generator=g) * spread + 1000.0 * spread).to(dtype)
    m = normlab.GroupNorm(6, num_groups=3, affine=False) if name == "gn" else normlab.BatchNorm(6, affine=False)
    with fast_path(True):
        y = m(x)
    xd = x.double().reshape(4, 3, -1) if name == "gn" else x.double().transpose(0, 1).reshape(6, -1)
    dims = 2 if name == "gn" else 1
    yd = (xd - xd.mean(dims, keepdim=True)) / (xd.var(dims, unbiased=False, keepdim=True) + 1e-5).sqrt()
    ref = yd.reshape(x.shape) if name == "gn" else yd.reshape(6, 4, 32, 32).transpose(0, 1)
    assert ref.std().item() > 0.5  # (the values do spread)
    ulp = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    assert ((y.double() - ref).abs() <= ulp * ref.abs() + 1e-6).all()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("name", ["bn", "ln", "in", "gn", "rms", "brn", "bin", "sn", "pn", "evos0", "evob0"])
def test_half_saves_one_input_sized_tensor(name, dtype):
    x = _input("cf", dtype).requires_grad_()
    m = _layer(name, 6)
    with fast_path(True):
        saved = saved_bytes(lambda: m(x))
    # one input-sized tensor in the input's dtype, plus per-(n, c) statistics (float64 at most)
    assert saved <= x.numel() * x.element_size() + 4 * 6 * 8 * 8 + 4096


@pytest.mark.parametrize("name,native", [
    ("bn", lambda: torch.nn.BatchNorm2d(6)), ("gn", lambda: torch.nn.GroupNorm(2, 6)),
    ("in", lambda: torch.nn.InstanceNorm2d(6, affine=True)), ("ln", None), ("rms", None)])
def test_autocast_output_dtype_as_torch(name, native):
    """Under CPU autocast torch's norms return the input's dtype (a bfloat16 activation from a
    convolution stays bfloat16, a float32 input stays float32); normlab's do the same."""
    conv = torch.nn.Conv2d(3, 6, 3, padding=1)
    x = torch.randn(4, 3, 8, 8)
    m = _layer(name, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = m(h)
        assert y.dtype == (native()(h).dtype if native is not None else torch.bfloat16)
        assert m(h.float()).dtype == torch.float32
        y.float().sum().backward()
    assert conv.weight.grad is not None and all(p.grad.dtype == torch.float32 for p in m.parameters())
