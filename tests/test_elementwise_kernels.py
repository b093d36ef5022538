"""Dynamic Tanh and Dynamic erf on the compiled kernels (``_kernels/elementwise_impl.h``)
against a float64 reference written from the papers' equations, y = w_c f(alpha x + s) + b_c
(f = tanh, erf), differentiated by torch's autograd: output and every gradient, in every
element type, in both kernel layouts, with and without weight and bias, odd sizes; gradcheck,
double backward, NaN and inf as torch, saved tensors, autocast, and the switch back to the
torch-operations path."""

from __future__ import annotations

import pytest
import torch

import normlab
import normlab.functional as NF
from normlab import _kernels
from normlab.functional.elementwise import _kernel_layout

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="compiled kernels unavailable")

# (shape, channel_dim, memory format, the kernels' layout)
CASES = [
    ((3, 7, 13), -1, None, "cl"),  # transformer (N, T, C), C not a multiple of the vector width
    ((1, 1, 40), -1, None, "cl"),  # one row
    ((3, 400, 24), -1, None, "cl"),  # 1200 rows: the backward's sums pass MAX_ROWS (512) a thread
    ((2, 5, 3, 7), 1, None, "cf"),  # (N, C, H, W), odd L
    ((2, 5, 3, 7), 1, torch.channels_last, "cl"),  # the same in channels-last memory
    ((4, 6), 1, None, "cl"),  # (N, C): one value per (n, c)
    ((2, 3, 9, 2), 2, None, None),  # channel axis in the middle: the torch operations
]
DTYPES = {torch.float32: (2e-6, 2e-6), torch.float64: (1e-12, 1e-12), torch.bfloat16: (1e-2, 1e-2),
          torch.float16: (2e-3, 2e-3)}


def reference(kind, x, alpha, shift, weight, bias, cd):
    """The equation in float64 (inputs rounded to x's type first, as the layer computes)."""
    shape = [1] * x.ndim
    shape[cd] = -1
    z = alpha * x + (shift if shift is not None else 0.0)
    f = torch.tanh(z) if kind == "dyt" else torch.erf(z)
    w = weight.view(shape) if weight is not None else 1.0
    b = bias.view(shape) if bias is not None else 0.0
    return w * f + b


def call(kind, x, alpha, shift, weight, bias, cd):
    if kind == "dyt":
        return NF.dynamic_tanh(x, alpha, weight, bias, channel_dim=cd)
    return NF.dynamic_erf(x, alpha, shift, weight, bias, channel_dim=cd)


def inputs(shape, cd, fmt, dtype, affine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64) * 2
    c = shape[cd]
    alpha = torch.tensor([0.7], dtype=torch.float64)
    shift = torch.tensor([0.3], dtype=torch.float64)
    weight = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    bias = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    dy = torch.randn(shape, generator=g, dtype=torch.float64)
    cast = [t if t is None else t.to(dtype) for t in (x, alpha, shift, weight, bias, dy)]
    if fmt is not None:
        cast[0] = cast[0].contiguous(memory_format=fmt)
    return cast


def grads(kind, x, alpha, shift, weight, bias, dy, cd, fn):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, alpha, shift, weight, bias)]
    if leaves[0].ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
        leaves[0] = leaves[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    if kind == "dyt":
        leaves[2] = None
    y = fn(kind, *leaves, cd)
    y.backward(dy)
    return y, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_kernels_match_the_float64_equation(kind, case, dtype, affine):
    shape, cd, fmt, layout = case
    x, alpha, shift, weight, bias, dy = inputs(shape, cd, fmt, dtype, affine)
    assert _kernel_layout(x, cd % x.ndim) == layout
    y, got = grads(kind, x, alpha, shift, weight, bias, dy, cd, call)
    to64 = [None if t is None else t.double() for t in (x, alpha, shift, weight, bias)]
    y_ref, want = grads(kind, *to64, dy.double(), cd % x.ndim, reference)
    assert y.dtype == dtype and y.shape == x.shape and y.stride() == x.stride()
    rtol, atol = DTYPES[dtype]
    if layout is None and dtype in (torch.bfloat16, torch.float16):  # torch's operations round each step
        rtol, atol = 4 * rtol, 4 * atol
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol)
    scale = dy.double().abs().sum().item()  # the parameters' gradients are sums over everything
    for name, g, w in zip(("x", "alpha", "shift", "weight", "bias"), got, want):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == dtype, name
        tol = atol * (1 if name == "x" else scale)
        torch.testing.assert_close(g.double(), w, rtol=rtol, atol=tol, msg=lambda m: f"{name}: {m}")


def test_float32_parameters_with_bfloat16_input():
    x, alpha, shift, _, _, dy = inputs((4, 5, 24), -1, None, torch.bfloat16, False)
    weight, bias = torch.randn(24), torch.randn(24)
    y, got = grads("derf", x, alpha, shift, weight, bias, dy, -1, call)
    with normlab.functional.fast_path(False):
        y_plain, want = grads("derf", x, alpha, shift, weight, bias, dy, -1, call)
    torch.testing.assert_close(y, y_plain, rtol=1e-2, atol=2e-2)
    assert got[3].dtype == torch.float32 and got[4].dtype == torch.float32
    for g, w in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=0.5)


@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.parametrize("case", [((2, 3, 5), -1, None, "cl"), ((2, 3, 2, 3), 1, None, "cf"),
                                  ((2, 3, 2, 3), 1, torch.channels_last, "cl")])
def test_gradcheck_and_double_backward_on_the_kernels(kind, case):
    shape, cd, fmt, layout = case
    x, alpha, shift, weight, bias, _ = inputs(shape, cd, fmt, torch.float64, True, seed=2)
    assert _kernel_layout(x, cd % x.ndim) == layout
    args = [t.requires_grad_() for t in (x, alpha, shift, weight, bias)]

    def fn(x, a, s, w, b):
        return call(kind, x, a, s if kind == "derf" else None, w, b, cd)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.parametrize("case", [CASES[0], CASES[2]])
def test_nan_and_inf_as_torch(kind, case):
    shape, cd, fmt, _ = case
    for dtype in (torch.float32, torch.bfloat16):
        x, alpha, shift, weight, bias, dy = inputs(shape, cd, fmt, dtype, True)
        x.view(-1)[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        y, got = grads(kind, x, alpha, shift, weight, bias, dy, cd, call)
        to64 = [None if t is None else t.double() for t in (x, alpha, shift, weight, bias)]
        y_ref, want = grads(kind, *to64, dy.double(), cd % x.ndim, reference)
        rtol, atol = DTYPES[dtype]
        torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=atol, equal_nan=True)
        for g, w in zip(got, want):
            if w is not None:  # alpha's and the shift's gradients are NaN (0 * inf), as torch's
                assert torch.equal(torch.isnan(g), torch.isnan(w))
                assert torch.equal(torch.isinf(g), torch.isinf(w))


@pytest.mark.parametrize("kind", ["dyt", "derf"])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_only_the_input_is_saved(kind, fmt):
    m = normlab.make_norm(kind, 16, channel_dim=1)
    x = torch.randn(2, 16, 5, 5).contiguous(memory_format=fmt or torch.contiguous_format).requires_grad_()
    assert _kernel_layout(x, 1) is not None
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        m(x)
    big = [t for t in saved if t.numel() >= x.numel()]
    assert len(big) == 1 and big[0] is x


@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_fast_path_off_and_other_layouts_take_the_torch_operations(kind):
    m = normlab.make_norm(kind, 12, channel_dim=-1)
    with torch.no_grad():
        m.weight.normal_(), m.bias.normal_()
    x = torch.randn(3, 10, 24)[:, :, ::2]  # strided: in neither layout
    assert _kernel_layout(x, 2) is None and _kernel_layout(x.contiguous(), 2) == "cl"
    assert _kernel_layout(x.contiguous().transpose(1, 2).contiguous().transpose(1, 2), 2) == "cf"
    with normlab.functional.fast_path(False):
        assert _kernel_layout(x.contiguous(), 2) is None
        plain = m(x.contiguous())
    torch.testing.assert_close(m(x), plain, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m(x.contiguous()), plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_gradient_in_another_layout_and_deterministic_sums(kind):
    x, alpha, shift, weight, bias, _ = inputs((8, 40, 24), -1, None, torch.float32, True)
    leaves = [t.requires_grad_() for t in (x, alpha, shift, weight, bias)]
    if kind == "dyt":
        leaves[2] = shift = None
    used = [t for t in leaves if t is not None]

    def loss(y):  # dy: the linspace expanded over (8, 40) (strides 0, 0, 1): copied into x's layout
        return (y.sum((0, 1)) * torch.linspace(-1, 1, 24)).sum()

    runs = []
    for _ in range(2):
        runs.append(torch.autograd.grad(loss(call(kind, *leaves, -1)), used))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    with normlab.functional.fast_path(False):
        want = torch.autograd.grad(loss(call(kind, *leaves, -1)), used)
    for g, w in zip(runs[0], want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["dyt", "derf"])
def test_autocast_bfloat16_unchanged(kind):
    m = normlab.make_norm(kind, 16, channel_dim=-1)
    lin = torch.nn.Linear(16, 16)
    x = torch.randn(4, 8, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y32, y16 = m(x), m(lin(x))
        with normlab.functional.fast_path(False):
            p32, p16 = m(x), m(lin(x))
    assert y32.dtype == p32.dtype == torch.float32 and y16.dtype == p16.dtype == torch.bfloat16
    torch.testing.assert_close(y32, p32, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y16, p16, rtol=1e-2, atol=1e-2)


def test_bad_weight_shape_is_named():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match=r"dynamic_tanh: weight must have one value per channel, shape \(8,\)"):
        NF.dynamic_tanh(x, torch.ones(1), torch.ones(3))
    with pytest.raises(ValueError, match=r"dynamic_erf: bias must have one value per channel, shape \(3,\)"):
        NF.dynamic_erf(x, torch.ones(1), None, None, torch.ones(8), channel_dim=1)


@pytest.mark.parametrize("kind,bound", [("dyt", 6e-7), ("derf", 2e-7)])
def test_float32_derivative_error_over_a_sweep(kind, bound):
    # f'(z) from the kernels' f (tanh' = 1 - tanh^2 loses digits where tanh is near +-1: 5.1e-7
    # measured, torch's own float32 tanh backward 6.8e-8; erf' = 2/sqrt(pi) exp(-z^2): 1.5e-7, as torch's)
    x = torch.linspace(-12, 12, 200001).view(1, -1, 1).requires_grad_()
    y = call(kind, x, torch.ones(1), None, None, None, -1)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference(kind, x64, 1.0, None, None, None, 2).sum(), x64)
    assert (dx.double() - want).abs().max().item() <= bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,floor", [("dyt", 2e-6), ("derf", 0.0)])
def test_half_types_derivative_over_a_sweep(kind, dtype, floor):
    # f'(z) as the half types' kernels compute it, rounded to the type: within two ulps of the
    # float64 derivative at the same (rounded) input, plus for tanh' = 1 - tanh^2 the absolute
    # error of nl_tanhf_half near +-1 (4.5e-7 relative: under 1e-6); erf' = 2/sqrt(pi) exp(-z^2)
    # keeps its relative accuracy down to the type's subnormals (2^(-u^2) by nl_exp2_half)
    x = torch.linspace(-6, 6, 40001).to(dtype).unique().view(1, -1, 1).requires_grad_()
    y = call(kind, x, torch.ones(1, dtype=dtype), None, None, None, -1)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    x64 = x.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(reference(kind, x64, 1.0, None, None, None, 2).sum(), x64)
    fi = torch.finfo(dtype)
    bound = 2 * fi.eps * want.abs() + floor + fi.tiny * fi.eps
    assert ((dx.double() - want).abs() <= bound).all()
