"""Issue 18, items 8 and 9: one dtype rule for every layer at every input size, and
OnlineNorm's edge cases.

Item 8: torch's rule (its layers refuse an input whose dtype is not their parameters', and
take float16/bfloat16 into a float32 layer): every normlab norm applies it on small inputs
and on inputs large enough for the fused and compiled paths, in training and eval, with a
TypeError naming the layer and every buffer (``num_batches_tracked`` included) untouched.
Item 9: an OnlineNorm input with no sample or no position streams nothing (buffers
bit-identical, the next batch as if it never came); eval keeps a float16 input float16.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab
from normlab.registry import available_norms, parse_spec

C = 8
SIZES = {"small": (2, C, 4, 4), "large": (16, C, 64, 64)}  # large: 524288 values, past the fused thresholds
MISMATCHED = [(torch.float32, torch.float64), (torch.float64, torch.float32), (torch.float64, torch.float16),
              (torch.float64, torch.bfloat16)]


def _specs() -> list[str]:
    """Every registered norm as a layer of C channels (grouped ones with 4 groups); not ``none``
    (no layer) nor ``cbn`` (a wrapper of its convolution, built by ``convert``, not ``make_norm``)."""
    return [f"{s}:4" if parse_spec(s)[0].arg == "num_groups" else s for s in available_norms() if s not in ("none", "cbn")]


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("layer_dtype,input_dtype", MISMATCHED)
@pytest.mark.parametrize("spec", _specs())
def test_a_mismatched_dtype_is_refused_at_every_size(spec: str, layer_dtype: torch.dtype, input_dtype: torch.dtype,
                                                      size: str) -> None:
    for training in (True, False):
        m = normlab.make_norm(spec, C).to(layer_dtype).train(training)
        before = _state(m)
        x = torch.randn(SIZES[size]).to(input_dtype)
        with pytest.raises(TypeError) as err:
            m(x)
        msg = str(err.value)
        assert msg.startswith(f"{type(m).__name__}({C}"), msg  # names the layer
        assert f"input dtype {input_dtype}" in msg and str(layer_dtype) in msg, msg
        after = _state(m)
        assert all(torch.equal(before[k], after[k]) for k in before), spec  # num_batches_tracked included


@pytest.mark.parametrize("layer_dtype,input_dtype", MISMATCHED[:2])
def test_torch_refuses_the_same_pairs(layer_dtype: torch.dtype, input_dtype: torch.dtype) -> None:
    """The reference the rule follows: torch's own layers."""
    for layer in (nn.BatchNorm2d(C), nn.GroupNorm(4, C), nn.LayerNorm([C, 4, 4])):
        with pytest.raises(RuntimeError):
            layer.to(layer_dtype)(torch.randn(SIZES["small"]).to(input_dtype))


@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spec", _specs())
def test_half_precision_into_a_float32_layer_is_accepted(spec: str, half: torch.dtype, size: str) -> None:
    """Mixed precision (as torch's batch, group and layer norm allow): the output keeps the
    input's dtype and is the float32 layer's output on the same values, to half precision."""
    x = torch.randn(SIZES[size]).to(half)
    for training in (True, False):
        torch.manual_seed(0)
        m = normlab.make_norm(spec, C).train(training)
        ref = normlab.make_norm(spec, C).train(training)
        ref.load_state_dict(m.state_dict())
        y = m(x)
        assert y.dtype == half, (spec, y.dtype)
        want = ref(x.float())
        tol = 0.06 if half == torch.bfloat16 else 0.01
        assert (y.float() - want).abs().max() <= tol * (1 + want.abs().max()), spec


# ------------------------------------------------------------------ OnlineNorm, item 9
@pytest.mark.parametrize("shape", [(4, C, 0), (3, C, 0, 5), (0, C, 5), (0, C)])
def test_online_norm_input_without_values_streams_nothing(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    m, fresh = normlab.OnlineNorm(C), normlab.OnlineNorm(C)
    warm = torch.randn(6, C, 5)
    for layer in (m, fresh):  # some history, and control buffers that are not zero
        layer(warm).square().sum().backward()
    fresh.load_state_dict(m.state_dict())
    before = _state(m)
    x = torch.randn(shape, requires_grad=True)
    y = m(x)
    y.sum().backward()
    assert y.shape == x.shape and x.grad is not None and x.grad.shape == x.shape
    after = _state(m)
    assert all(torch.equal(before[k], after[k]) for k in before)  # not NaN: unchanged
    nxt = torch.randn(5, C, 5)
    assert torch.equal(m(nxt), fresh(nxt))  # as if the empty input never came


@pytest.mark.parametrize("shape", list(SIZES.values()))
@pytest.mark.parametrize("half", [torch.float16, torch.bfloat16])
def test_online_norm_eval_keeps_the_input_dtype(shape: tuple[int, ...], half: torch.dtype) -> None:
    torch.manual_seed(0)
    m = normlab.OnlineNorm(C)
    m(torch.randn(8, C, 4, 4) * 3 + 1)  # streamed statistics away from (0, 1)
    m.eval()
    x = torch.randn(shape).to(half)
    y = m(x)
    assert y.dtype == half
    want = m(x.float())
    assert (y.float() - want).abs().max() <= 0.05 * (1 + want.abs().max())
