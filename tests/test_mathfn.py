"""The compiled kernels' float32 exp, tanh, erf and sigmoid (``_kernels/mathfn.h``) against
torch in float64, over a dense sweep, random bit patterns, tiny and huge values and the
special values, in float32 ulps of the correctly rounded result.

Measured (gcc 12, AVX-512 with FMA): exp 1.01 ulp, tanh 5.29 ulp (near |x| = 8, where tanh is
1 - 2e-7), erf 5.08 ulp (near |x| = 3.6), sigmoid 2.25 ulp where its value is a normal float
(torch's own float32 sigmoid: 2.25 too; below x = -87.3 both round 1 / (1 + inf) to 0).
"""

from __future__ import annotations

import pytest
import torch

from normlab import _kernels

pytestmark = pytest.mark.skipif(not _kernels.available(), reason="compiled kernels unavailable")

BOUND_ULPS = {"exp": 1.5, "tanh": 6.0, "erf": 6.0, "sigmoid": 3.0}
REFERENCE = {"exp": torch.exp, "tanh": torch.tanh, "erf": torch.erf, "sigmoid": torch.sigmoid}
FLT_MIN = 2.0**-126


def _math(name: str, x: torch.Tensor) -> torch.Tensor:
    from normlab._kernels.elementwise import math_function

    return math_function(name, x)


def _sweep() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    bits = torch.randint(-2**31, 2**31, (1_000_000,), generator=g, dtype=torch.int64).to(torch.int32)
    tiny = torch.logspace(-45, 1.5, 50_000)
    x = torch.cat([torch.linspace(-120, 120, 1_000_001), torch.linspace(-10, 10, 1_000_001), tiny, -tiny,
                   bits.view(torch.float32)])
    return x[torch.isfinite(x)]


def _ulps(got: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """|got - ref| in units of the last place of ref rounded to float32."""
    a = ref.float().abs()
    ulp = (torch.nextafter(a, torch.tensor(float("inf"))) - a).double()
    return (got.double() - ref).abs() / ulp


@pytest.mark.parametrize("name", list(REFERENCE))
def test_float32_error_in_ulps(name):
    x = _sweep()
    got, ref = _math(name, x), REFERENCE[name](x.double())
    fin = torch.isfinite(ref.float())
    assert torch.equal(got[~fin], ref[~fin].float())  # overflow to inf where float32 overflows
    checked = fin & (ref.abs() >= FLT_MIN) if name == "sigmoid" else fin
    err = _ulps(got[checked], ref[checked])
    assert err.max().item() <= BOUND_ULPS[name], (name, err.max().item(), x[checked][err.argmax()].item())
    if name == "sigmoid":  # subnormal values: as torch's float32 sigmoid, within FLT_MIN
        assert (got[~checked] - ref[~checked]).abs().max().item() <= FLT_MIN


@pytest.mark.parametrize("name", list(REFERENCE))
def test_special_values_as_torch(name):
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1e-30, -1e-30, 200.0, -200.0])
    got, want = _math(name, x), REFERENCE[name](x)
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], rtol=1e-6, atol=0)
    assert torch.equal(torch.signbit(got[ok]), torch.signbit(want[ok]))  # tanh(-0) = -0, erf(-0) = -0


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", list(REFERENCE))
def test_other_types_round_the_float_result(name, dtype):
    x = torch.linspace(-12, 12, 20001, dtype=torch.float64).to(dtype)
    got, ref = _math(name, x), REFERENCE[name](x.double())
    if dtype == torch.float64:  # libm
        torch.testing.assert_close(got, ref, rtol=1e-15, atol=1e-300)
    else:  # computed in float32, rounded once: at most one ulp of the half type off
        ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=torch.finfo(dtype).tiny)
        fin = torch.isfinite(ref.to(dtype))
        assert ((got.double() - ref).abs()[fin] <= ulp[fin]).all()


def test_activation_exp_in_its_range_and_clamped_beyond():
    # the epilogues' exp (SiLU, GELU): nl_expf's accuracy on [-86, 88], the value at the range's
    # end beyond it (finite and normal: no overflow or subnormal handling there)
    x = torch.cat([torch.linspace(-86, 88, 2_000_001), torch.linspace(-1, 1, 100_001)])
    got, ref = _math("exp_act", x), torch.exp(x.double())
    assert _ulps(got, ref).max().item() <= BOUND_ULPS["exp"]
    far = torch.tensor([-1e30, -500.0, -86.5, 88.5, 1000.0, float("inf"), float("-inf")])
    want = torch.exp(far.clamp(-86, 88).double()).float()
    torch.testing.assert_close(_math("exp_act", far), want, rtol=2e-7, atol=0)
    assert torch.isnan(_math("exp_act", torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_activation_exp_within_one_ulp(dtype):
    # the half types' epilogue exp (nl_expf_half: a shorter polynomial) rounds to the nearest
    # or next half-precision value of exp over the epilogues' range, and clamps beyond it
    x = torch.linspace(-86, 88, 400_001).to(dtype).unique()
    got, ref = _math("exp_act", x), torch.exp(x.double())
    ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=torch.finfo(dtype).tiny)
    fin = torch.isfinite(ref.to(dtype))
    assert ((got.double() - ref).abs()[fin] <= ulp[fin]).all()
    # and it is correctly rounded but for values within its 1.6e-5 of a rounding midpoint (a
    # polynomial one degree shorter, 3e-4, would misround about half of the float16 values)
    assert (got[fin] != ref[fin].to(dtype)).double().mean().item() < 0.01
    assert torch.isinf(got[~fin]).all()  # (float16 beyond 11.09: overflow, as torch's exp)
    far = torch.tensor([-1e30, -500.0, 1000.0, float("inf"), float("-inf")]).to(dtype)
    assert torch.equal(_math("exp_act", far), torch.exp(far.double().clamp(-86, 88)).to(dtype))
    assert torch.isnan(_math("exp_act", torch.tensor([float("nan")], dtype=dtype))).all()


# ------------------------------------------------- the half types' GELU (nl_gelu_half)
# The exact GELU v Phi(v) and its derivative Phi(v) + v phi(v) as the bfloat16/float16 epilogues
# compute them (no erf, no division: Phi(-|v|) = 2^P(|v|)), evaluated unrounded on float32
# input ("gelu_half", "gelu_grad_half") against float64, and as the half types round them
# ("gelu", "gelu_grad" on half input).

def _gelu64(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    v = v.double()
    cdf, pdf = torch.special.ndtr(v), torch.exp(-v * v / 2) / (2 * torch.pi) ** 0.5
    return v * cdf, cdf + v * pdf


def _gelu_sweep() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    tiny = torch.logspace(-38, 0.77, 20_001)
    return torch.cat([torch.linspace(-6, 6, 2_400_001), torch.randn(200_000, generator=g) * 2, tiny, -tiny,
                      torch.tensor([0.0, -0.0])])


def test_half_gelu_relative_error_well_below_a_float16_half_ulp():
    # on |v| <= 6 (where torch's float32 GELU is not yet 0): GELU within 2e-5 of its value
    # (measured 8.7e-6, float16's half-ulp is 2^-12 = 2.4e-4) and GELU' within 1e-4 (measured
    # 6.7e-5) plus 1e-8 (GELU' is 0 at v = -0.7518, whose float32 position is 1.2e-8 off)
    x = _gelu_sweep()
    x = x[x.abs() <= 6]
    want, want_grad = _gelu64(x)
    got, grad = _math("gelu_half", x).double(), _math("gelu_grad_half", x).double()
    rel = ((got - want).abs() / want.abs())[want != 0]
    assert rel.max().item() <= 2e-5, (rel.max().item(), x[want != 0][rel.argmax()].item())
    assert ((grad - want_grad).abs() <= 1e-4 * want_grad.abs() + 1e-8).all()
    assert (got[x == 0] == 0).all() and (grad[x == 0] - 0.5).abs().max() < 1e-4


def test_half_gelu_beyond_its_range_and_special_values():
    # beyond |v| = 6: v itself (within float32) above, a value of size < 6e-9 below, 4.2e-36
    # beyond -12.5 (never growing with |v|); the derivative 1 and 0 there
    far = torch.cat([torch.linspace(6, 1e4, 10_001), torch.logspace(4, 38, 1001)])
    assert (_math("gelu_half", far) == far).all()
    assert ((_math("gelu_grad_half", far) - 1).abs() <= 1e-7).all()
    low = _math("gelu_half", -far)
    assert (low <= 0).all() and (low.abs() < 6e-9).all() and (low[far > 12.5].abs() < 5e-36).all()
    assert (_math("gelu_grad_half", -far).abs() < 1e-7).all()
    special = torch.tensor([float("nan"), float("inf"), -float("inf")])
    got, grad = _math("gelu_half", special), _math("gelu_grad_half", special)
    assert torch.isnan(got[0]) and torch.isnan(grad[0])
    assert got[1] == float("inf") and grad[1] == 1.0
    assert got[2] <= 0 and got[2].abs() < 5e-36 and grad[2].abs() < 1e-33


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_types_gelu_rounds_the_float_result(dtype):
    # the half types' epilogue GELU and derivative on |v| <= 6: within one ulp of the type of
    # the float64 value (the float16 subnormals: within one subnormal step), and correctly
    # rounded but for values within the polynomials' error of a rounding midpoint (measured,
    # float16: GELU 0.17% of the values, GELU' 3.2%, whose R has 6e-5 relative error)
    x = torch.linspace(-6, 6, 200_001).to(dtype).unique()
    want, want_grad = _gelu64(x)
    tiny = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    for name, ref, misrounded in (("gelu", want, 0.005), ("gelu_grad", want_grad, 0.05)):
        got = _math(name, x)
        assert got.dtype == dtype
        ulp = torch.finfo(dtype).eps * ref.abs() + tiny
        assert ((got.double() - ref).abs() <= ulp).all(), name
        assert (got != ref.to(dtype)).double().mean().item() < misrounded, name


# ------------------------------------------------- the half types' tanh and erf
# Dynamic tanh's and Dynamic erf's bfloat16/float16 passes compute tanh and erf by fits of lower
# degree (nl_tanhf_half, nl_erff_half), their results rounded to the half type.

@pytest.mark.parametrize("name,bound", [("tanh", 1e-6), ("erf", 8e-6)])
def test_half_tanh_and_erf_relative_error_unrounded(name, bound):
    # on float32 input, unrounded, against float64, where the result is a normal float: tanh
    # within 1e-6 of its value (fitted 4.5e-7 on [0, 9.2], plus float32 rounding; its
    # derivative 1 - tanh^2 is taken from it), erf within 8e-6 (fitted 5.3e-6 on [0, 3.5],
    # erfc(3.5) = 7e-7 beyond); both odd, +-1 at the ends (within
    # that error)
    x = _sweep()
    got, ref = _math(f"{name}_half", x).double(), REFERENCE[name](x.double())
    nz = ref.abs() >= FLT_MIN
    rel = (got - ref).abs()[nz] / ref.abs()[nz]
    assert rel.max().item() <= bound, (name, rel.max().item(), x[nz][rel.argmax()].item())
    assert torch.equal(_math(f"{name}_half", -x), -_math(f"{name}_half", x))
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    got = _math(f"{name}_half", special)
    assert torch.isnan(got[0]) and (got[1] - 1).abs() <= 1e-6 and got[2] == -got[1]
    assert torch.equal(torch.signbit(got[3:]), torch.tensor([False, True]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["tanh", "erf"])
def test_half_tanh_and_erf_rounding(name, dtype):
    # as the half types' units compute them: correctly rounded but for values within the fits'
    # error of a rounding midpoint (measured: float16 erf 0.35% of the values, tanh 0.1%)
    x = torch.linspace(-12, 12, 200_001).to(dtype).unique()
    got, ref = _math(name, x), REFERENCE[name](x.double())
    assert torch.equal(got, _math(f"{name}_half", x.float()).to(dtype))
    assert (got != ref.to(dtype)).double().mean().item() < 0.01
    ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=torch.finfo(dtype).tiny)
    assert ((got.double() - ref).abs() <= ulp).all()
