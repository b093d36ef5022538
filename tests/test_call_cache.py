"""The per-layer cache of ready calls (``normlab.layers.base.Norm._cached_call``).

On small inputs bn, ln, gn and lnc keep, per input signature, the call of torch's kernel the
first call resolved to. These tests check the cached calls against torch's own layers (outputs,
input and parameter gradients, running statistics, num_batches_tracked) over sequences of calls
that change the layer in between (eval/train, momentum, eps, dtype, load_state_dict, fast_path,
the kernel switch, autocast, functional_call, parametrizations, copies), that bad input after a
cached good call still raises the layer's own error, and that the cache stays per layer and
bounded.
"""

from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.nn.utils import parametrize

from normlab import _kernels
from normlab.engine import fast_path
from normlab.layers import BatchNorm, ChannelLayerNorm, ChannelRMSNorm, GroupNorm, LayerNorm
from normlab.layers.base import _MAX_CALLS, _NO_CALL

from _helpers import randomize_affine


def _pair(kind: str, dtype: torch.dtype = torch.float32, **kw) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """(normlab layer, torch's same layer with the same state, input shape) for a small case."""
    if kind == "bn2d":
        ours, ref, shape = BatchNorm(16, **kw), nn.BatchNorm2d(16, **kw), (8, 16, 8, 8)
    elif kind == "bn1d":
        ours, ref, shape = BatchNorm(32, **kw), nn.BatchNorm1d(32, **kw), (64, 32)
    elif kind == "bn_seq":
        ours, ref, shape = BatchNorm(12, **kw), nn.BatchNorm1d(12, **kw), (4, 12, 20)
    elif kind == "gn":
        ours, ref, shape = GroupNorm(16, 4, **kw), nn.GroupNorm(4, 16, **kw), (8, 16, 8, 8)
    elif kind == "ln":
        ours, ref, shape = LayerNorm(16, **kw), nn.GroupNorm(1, 16, **kw), (8, 16, 8, 8)
    elif kind == "lnc":
        ours, ref, shape = ChannelLayerNorm(32, channel_dim=-1, **kw), nn.LayerNorm(32, **kw), (4, 10, 32)
    elif kind == "rmsc":
        ours, ref, shape = ChannelRMSNorm(32, channel_dim=-1, **kw), nn.RMSNorm(32, eps=1e-6, **kw), (4, 10, 32)
    elif kind == "lnc_rows":  # large enough for the engine's row passes in bfloat16 (torch's in float32)
        ours, ref, shape = ChannelLayerNorm(512, channel_dim=-1, **kw), nn.LayerNorm(512, **kw), (8, 128, 512)
    elif kind == "rmsc_rows":  # large enough for the engine's row passes
        ours, ref, shape = ChannelRMSNorm(512, channel_dim=-1, **kw), nn.RMSNorm(512, eps=1e-6, **kw), (4, 64, 512)
    else:
        raise AssertionError(kind)
    ours, ref = ours.to(dtype), ref.to(dtype)
    randomize_affine(ref)
    ours.load_state_dict(ref.state_dict())
    return ours, ref, shape


def _started(kind: str, seed: int, steps: int = 1) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A pair from :func:`_pair` and an input, after ``steps`` checked calls (so a call is kept)."""
    torch.manual_seed(seed)
    ours, ref, shape = _pair(kind)
    x = torch.randn(shape)
    for _ in range(steps):
        _check_step(ours, ref, x)
    return ours, ref, x


def _kept(layer: nn.Module) -> int:
    """How many ready calls the layer keeps (signatures that take the cached path)."""
    return sum(v is not _NO_CALL for v in layer._calls.values())


def _check_step(ours: nn.Module, ref: nn.Module, x: torch.Tensor, backward: bool = True, tol: float = 1e-6) -> None:
    """One call of each layer on copies of ``x``: outputs, gradients and state agree."""
    xa, xb = x.clone().requires_grad_(backward), x.clone().requires_grad_(backward)
    ya, yb = ours(xa), ref(xb)
    assert ya.dtype == yb.dtype
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    if backward:
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        torch.testing.assert_close(xa.grad, xb.grad, rtol=10 * tol, atol=tol)
        params = dict(ours.named_parameters())
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name].grad, p.grad, rtol=10 * tol, atol=10 * tol)
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    mine = ours.state_dict()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(mine[k], v, rtol=1e-6, atol=1e-7, msg=f"{k} differs")


def _check_half_step(ours: nn.Module, ref: nn.Module, x: torch.Tensor, tol: float) -> None:
    """A half-precision input to layers with float32 parameters (as under autocast): output and
    input gradient against torch's layer, the parameters' gradients against a float64 copy of
    it (torch's bfloat16 layer norm sums its weight's gradient less exactly, 0.1 relative at
    (8, 56, 56, 64), than the row passes: test_kernels.py holds those to float64)."""
    exact = copy.deepcopy(ref).double()
    xa, xb, xe = x.clone().requires_grad_(), x.clone().requires_grad_(), x.double().requires_grad_()
    ya, yb, ye = ours(xa), ref(xb), exact(xe)
    assert ya.dtype == yb.dtype
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    g = torch.randn_like(ya)
    ya.backward(g), yb.backward(g), ye.backward(g.double())
    torch.testing.assert_close(xa.grad, xb.grad, rtol=4 * tol, atol=4 * tol)
    params = dict(ours.named_parameters())
    for name, p in exact.named_parameters():
        got = params[name].grad
        assert got.dtype == params[name].dtype
        torch.testing.assert_close(got.double(), p.grad, rtol=tol, atol=tol * max(1.0, p.grad.abs().max().item()))
    ours.zero_grad(set_to_none=True), ref.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["bn2d", "bn1d", "bn_seq", "gn", "ln", "lnc", "rmsc", "rmsc_rows"])
def test_cached_calls_equal_torch_through_changes(kind):
    torch.manual_seed(0)
    ours, ref, shape = _pair(kind)
    # (the engine's row passes sum the weight's gradient over 256 rows in another order than
    # torch's RMSNorm: float32 rounding apart, a few 1e-5)
    tol = 1e-5 if kind == "rmsc_rows" else 1e-6
    x = torch.randn(shape) * 2 + 0.5
    for _ in range(3):
        _check_step(ours, ref, x, tol=tol)
    assert _kept(ours) == 1  # the calls above ran on the kept call
    ours.eval(), ref.eval()
    for _ in range(2):
        _check_step(ours, ref, x, tol=tol)
    ours.train(), ref.train()
    _check_step(ours, ref, x, tol=tol)
    if kind.startswith("bn"):
        ours.momentum = ref.momentum = 0.5
        _check_step(ours, ref, x, tol=tol)
        ours.momentum = ref.momentum = None  # the cumulative average: not torch's route, same numbers
        for _ in range(2):
            _check_step(ours, ref, x, tol=tol)
        ours.momentum = ref.momentum = 0.3
    ours.eps = ref.eps = 1e-2
    _check_step(ours, ref, x, tol=tol)
    with fast_path(False):  # the plain reference inside a cached signature
        _check_step(ours, ref, x, tol=tol)
    with _kernels.enabled(False):
        _check_step(ours, ref, x, tol=tol)
    state = {k: v + 0.25 if v.is_floating_point() else v + 3 for k, v in ref.state_dict().items()}
    ours.load_state_dict(state), ref.load_state_dict(state)
    _check_step(ours, ref, x, tol=tol)
    ours.double(), ref.double()
    for _ in range(2):
        _check_step(ours, ref, x.double(), tol=tol)
    with pytest.raises(TypeError, match="does not match the layer's torch.float64"):
        ours(x.clone().requires_grad_())  # float32 (a cached signature) into the float64 layer: refused
    with torch.no_grad():
        _check_step(ours, ref, x.double(), backward=False, tol=tol)
    ours.eval(), ref.eval()
    with torch.inference_mode():
        _check_step(ours, ref, x.double(), backward=False, tol=tol)


@pytest.mark.parametrize("kind", ["bn2d", "gn", "lnc", "lnc_rows", "rmsc", "rmsc_rows"])
def test_cached_calls_under_autocast(kind):
    torch.manual_seed(1)
    ours, ref, shape = _pair(kind)
    x = torch.randn(shape)
    # (bfloat16 outputs: the engine's row passes and torch's RMSNorm compute in float32 in a
    # different order, so a value near a rounding boundary can land an ulp apart)
    half_tol = 2.0 ** -6 if kind.endswith("_rows") else 1e-6
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(3):
            _check_step(ours, ref, x)
        for _ in range(2):
            if kind == "lnc_rows":
                _check_half_step(ours, ref, x.bfloat16(), tol=half_tol)
            else:
                _check_step(ours, ref, x.bfloat16(), tol=half_tol)


def test_bad_input_after_a_cached_call_raises_the_layers_error():
    torch.manual_seed(2)
    bn = BatchNorm(16)
    x = torch.randn(8, 16, 4, 4)
    bn(x), bn(x)
    assert _kept(bn) == 1
    tracked = bn.num_batches_tracked.item()
    with pytest.raises(ValueError, match=r"BatchNorm\(16\): expected 16 channels"):
        bn(torch.randn(8, 15, 4, 4))
    with pytest.raises(TypeError, match=r"BatchNorm\(16\): expected a floating-point input"):
        bn(torch.ones(8, 16, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match=r"BatchNorm\(16\): input dtype torch.float64 does not match"):
        bn(x.double())
    with pytest.raises(ValueError, match=r"BatchNorm\(16\): in training, statistics over axes"):
        bn(torch.randn(1, 16))
    with pytest.raises(TypeError, match=r"BatchNorm\(16\): expected a torch.Tensor"):
        bn(x.numpy())
    assert bn.num_batches_tracked.item() == tracked  # refused calls changed nothing
    gn = GroupNorm(16, 4, check_finite=True)
    gn(x), gn(x)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"GroupNorm\(16\): input holds NaN"):
        gn(bad)  # check_finite layers validate every call
    lnc = ChannelLayerNorm(16, channel_dim=-1)
    lnc(torch.randn(4, 5, 16))
    with pytest.raises(ValueError, match=r"ChannelLayerNorm\(16\): expected 16 channels"):
        lnc(torch.randn(4, 16, 5))


def test_cache_is_per_layer_and_bounded():
    torch.manual_seed(3)
    a, ra, _ = _pair("gn")
    b, rb, _ = _pair("gn")  # other random affine parameters
    x = torch.randn(8, 16, 8, 8)
    for _ in range(2):
        _check_step(a, ra, x)
        _check_step(b, rb, x)
    assert a._calls is not b._calls and _kept(a) == _kept(b) == 1
    for n in range(2, 2 + 3 * _MAX_CALLS):  # many signatures: the cache stays bounded
        _check_step(a, ra, torch.randn(n, 16, 3, 3), backward=False)
        assert len(a._calls) <= _MAX_CALLS


def test_copies_and_pickles_do_not_share_the_cache():
    torch.manual_seed(4)
    bn = BatchNorm(16)
    x = torch.randn(8, 16, 4, 4)
    bn(x)
    twin = copy.deepcopy(bn)
    before = bn.running_mean.clone()
    twin(x * 3 + 1), twin(x * 3 + 1)
    torch.testing.assert_close(bn.running_mean, before)  # the copy counted and averaged into its own
    assert bn.num_batches_tracked.item() == 1 and twin.num_batches_tracked.item() == 3
    buf = io.BytesIO()
    torch.save(bn, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    ref = nn.BatchNorm2d(16)
    ref.load_state_dict(loaded.state_dict())
    _check_step(loaded, ref, x)
    state = loaded.__getstate__()
    del state["_calls"]  # as a layer pickled before the cache existed
    old = BatchNorm.__new__(BatchNorm)
    old.__setstate__(state)
    _check_step(old, ref, x)
    _check_step(old, ref, x)


def test_functional_call_and_parametrizations_see_their_own_tensors():
    ours, ref, x = _started("bn2d", 5, steps=2)
    swapped = {k: v * 0.5 + 0.1 if v.is_floating_point() else v for k, v in ref.state_dict().items()}
    ya = functional_call(ours, {k: v.clone() for k, v in swapped.items()}, (x,))
    yb = functional_call(ref, {k: v.clone() for k, v in swapped.items()}, (x,))
    torch.testing.assert_close(ya, yb, rtol=1e-6, atol=1e-6)

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    g, rg, xg = _started("gn", 5)
    parametrize.register_parametrization(g, "weight", Double())
    parametrize.register_parametrization(rg, "weight", Double())
    _check_step(g, rg, xg)
    _check_step(g, rg, xg)


def test_assigning_parameters_and_buffers_is_seen():
    ours, ref, x = _started("bn1d", 6)
    w = torch.rand(32) + 0.5
    ours.weight, ref.weight = nn.Parameter(w.clone()), nn.Parameter(w.clone())
    ours.running_var, ref.running_var = torch.full((32,), 2.0), torch.full((32,), 2.0)
    _check_step(ours, ref, x)
    ours.eval(), ref.eval()
    _check_step(ours, ref, x)
    ours.running_mean = ours.running_var = None  # eval with batch statistics
    ref.running_mean = ref.running_var = None
    _check_step(ours, ref, x)


def test_compile_traces_past_the_cache():
    ours, ref, x = _started("gn", 7)
    compiled = torch.compile(ours, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), ref(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind,dtype,shape,on_rows", [
    ("rmsc", torch.float32, (64, 512), True), ("rmsc", torch.float32, (4, 64, 512), True),
    ("rmsc", torch.float32, (8, 16, 64), True),
    ("lnc", torch.float32, (64, 512), False), ("lnc", torch.float32, (8, 128, 512), False),
    ("lnc", torch.bfloat16, (8, 128, 512), True), ("lnc", torch.bfloat16, (128, 64, 64), True),
    ("lnc", torch.float16, (8, 128, 512), None), ("lnc", torch.float16, (8, 64, 256), False),
    ("lnc", torch.bfloat16, (8, 64, 256), False)])
def test_rows_route_torch_below_the_crossover_and_the_kernels_above(monkeypatch, kind, dtype, shape, on_rows):
    """Both routes keep a ready call; above the crossover it runs the engine's row passes
    (counted), below it torch's kernel (no row pass). (on_rows None: float16 takes the row passes
    where the kernels convert it with F16C.)"""
    if on_rows is None:
        on_rows = _kernels.f16c()
    rows_calls = []
    real = _kernels.rows_forward
    monkeypatch.setattr(_kernels, "rows_forward", lambda *a: rows_calls.append(1) or real(*a))
    torch.manual_seed(8)
    c = shape[-1]
    if kind == "rmsc":
        ours, ref = ChannelRMSNorm(c, channel_dim=-1), nn.RMSNorm(c, eps=1e-6)
    else:
        ours, ref = ChannelLayerNorm(c, channel_dim=-1), nn.LayerNorm(c)
    randomize_affine(ref)
    ours.load_state_dict(ref.state_dict())
    tol = 1e-5 if dtype == torch.float32 else 2.0 ** -5  # (half inputs: float32 parameters, as under autocast)
    for _ in range(2):
        x = torch.randn(shape).to(dtype)
        if on_rows and dtype != torch.float32:
            _check_half_step(ours, ref, x, tol=tol)
        else:  # (torch's kernel on both sides: the same numbers)
            _check_step(ours, ref, x, tol=tol)
    assert _kept(ours) == 1
    assert len(rows_calls) == (2 if on_rows and _kernels.available() else 0)


def test_rms_norm_rows_forward_alone_below_the_crossover_on_torch(monkeypatch):
    """RMS norm over the channels below MIN_KERNEL_ROWS_NUMEL: a forward without a graph (eval,
    inference) takes torch's RMS-norm kernel (one call: the cheaper there), a training step the
    engine's row passes (cheaper forward and backward together at every size measured)."""
    rows_calls = []
    real = _kernels.rows_forward
    monkeypatch.setattr(_kernels, "rows_forward", lambda *a: rows_calls.append(1) or real(*a))
    ours, ref = ChannelRMSNorm(64, channel_dim=-1), nn.RMSNorm(64, eps=1e-6)
    randomize_affine(ref)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(8, 16, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-6, atol=1e-6)
    assert rows_calls == []
    _check_step(ours, ref, x, tol=1e-5)
    assert len(rows_calls) == (1 if _kernels.available() else 0)
