"""The routing table of normlab.engine.routing as every fast entry point sees it: which backend
(the engine's Function, torch's own batch- or group-norm kernel, or the plain autograd path) a
call takes by size, layout, dtype, the CPU's conversions (bfloat16 on AVX-512, float16 with
F16C), threads and process groups."""

from __future__ import annotations

import pytest
import torch

import normlab.functional as NF
from _helpers import graph_nodes
from normlab import _kernels, engine
from normlab.engine import fast_path
from normlab.engine import routing as _routing
from normlab.engine.routing import MIN_FAST_NUMEL

LARGE_NUMEL = 1 << 18  # inputs of this size take the engine wherever it runs
CL = torch.channels_last
FAST_NODES = {"EngineNormBackward"}

# one torch thread, the fast path forced on (the tests below set the mode they test), on each
# kernel mode (compiled kernels, or none)
pytestmark = pytest.mark.usefixtures("one_thread", "forced_fast_path", "kernel_mode")

_nodes = graph_nodes  # class names of every node in y's autograd graph


def _fast(y: torch.Tensor) -> bool:
    return bool(_nodes(y) & FAST_NODES)


ENTRY = {
    "bn": lambda x: NF.batch_norm(x, weight=torch.ones(x.shape[1])),
    "ln": lambda x: NF.layer_norm(x),
    "in": lambda x: NF.instance_norm(x),
    "gn": lambda x: NF.group_norm(x, 2),
    "rms": lambda x: NF.rms_norm(x),
    "mobn": lambda x: NF.mean_only_batch_norm(x),
    "brn": lambda x: NF.batch_renorm(x, torch.zeros(x.shape[1]), torch.ones(x.shape[1])),
    "bin": lambda x: NF.batch_instance_norm(x, torch.full((x.shape[1],), 0.5)),
    "sn": lambda x: NF.switchable_norm(x, torch.ones(3), torch.ones(3)),
}


TORCH_NODES = {"NativeBatchNormBackward0", "NativeGroupNormBackward0"}


def _route_of(y: torch.Tensor) -> str:
    """Which backend ran: "normlab" (the engine's Function), "torch" (torch's own batch- or
    group-norm kernel alone) or "plain" (autograd of elementary ops)."""
    nodes = _nodes(y)
    if nodes & FAST_NODES:
        return "normlab"
    return "torch" if nodes & TORCH_NODES else "plain"


def _expected_route(name: str, size: str, channels_last: bool, kernels: bool) -> str:
    """The routing table of normlab.engine.routing, written out for these inputs."""
    torch_fits = name in _routing.TORCH_NORMS and (name == "bn" or not channels_last)
    if torch_fits and (not kernels or size == "small"):
        return "torch"
    if not kernels:
        return "plain"
    if name == "bn":  # torch's kernel below MIN_KERNEL_NUMEL and channels-last
        return "normlab" if size == "large" and not channels_last else "torch"
    if name in ("ln", "gn", "in") and not channels_last:  # channel-first: torch's below MIN_KERNEL_GROUP_NUMEL
        return "torch"
    return "normlab"


@pytest.mark.parametrize("name", list(ENTRY))
@pytest.mark.parametrize("channels_last", [False, True])
def test_routing_table(name, channels_last, kernel_mode):
    """Small inputs run torch's own kernel of the same layer in one call where torch has one
    (bn, ln, in, gn); batch norm also below MIN_KERNEL_NUMEL and on channels-last input, and
    channel-first ln/gn/in below MIN_KERNEL_GROUP_NUMEL, where torch's kernel is the faster one;
    everything else the engine when the kernels built, else the plain path."""
    small = torch.randn(3, 4, 5, 5)
    middle = torch.randn(4, 4, 64, 72)
    large = torch.randn(4, 4, 256, 136)
    assert small.numel() < MIN_FAST_NUMEL <= middle.numel() < _routing.MIN_KERNEL_NUMEL <= large.numel()
    assert large.numel() < _routing.MIN_KERNEL_GROUP_NUMEL
    fmt = CL if channels_last else torch.contiguous_format
    small, middle, large = (t.contiguous(memory_format=fmt).requires_grad_() for t in (small, middle, large))
    kernels = kernel_mode == "c-kernels"
    with fast_path(None):  # automatic
        for size, x in (("small", small), ("middle", middle), ("large", large)):
            assert _route_of(ENTRY[name](x)) == _expected_route(name, size, channels_last, kernels), size
    with fast_path(True):
        torch_fits = name in _routing.TORCH_NORMS and (name == "bn" or not channels_last)
        want = "normlab" if kernels else ("torch" if torch_fits else "plain")
        assert _route_of(ENTRY[name](small)) == want
    with fast_path(False):
        assert _route_of(ENTRY[name](large)) == "plain"


@pytest.mark.parametrize("fast_cpu", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_batch_norm_runs_the_engine_where_its_conversions_are_fast(dtype, fast_cpu, monkeypatch, kernel_mode):
    """Large half-precision batch norm with backward: the engine in bfloat16 on AVX-512 CPUs and
    in float16 channel-first where the kernels convert it with F16C (both read here from a
    stand-in); torch's own kernel otherwise; with an activation the engine either way (its output
    pass applies it)."""
    if kernel_mode != "c-kernels":
        pytest.skip("the choice is between the compiled kernels and torch's")
    monkeypatch.setattr(_kernels, "wide_vectors", lambda: fast_cpu)
    monkeypatch.setattr(_kernels, "f16c", lambda: fast_cpu)
    _routing._ROUTES.clear()
    x = torch.randn(8, 16, 128, 128, dtype=dtype)  # 2M values: from MIN_HALF_BN_NUMEL a thread on
    monkeypatch.setattr(_routing, "MIN_HALF_BN_NUMEL", x.numel() // 4)
    monkeypatch.setattr(_routing, "MIN_F16_BN_NUMEL", x.numel() // 4)
    assert _routing.half_bn_on_kernels(dtype) == fast_cpu
    try:
        with fast_path(None):  # automatic (this module forces the engine on)
            y = NF.batch_norm(x.requires_grad_(), weight=torch.ones(16))
            assert _route_of(y) == ("normlab" if fast_cpu else "torch") and y.dtype == dtype
            fused = NF.batch_norm(x, weight=torch.ones(16), act="relu")
            assert _route_of(fused) == "normlab"
            # channels-last: float16 on torch's kernel even with F16C (the kernels' channels-last
            # passes convert float16 by bit operations)
            cl = NF.batch_norm(x.detach().contiguous(memory_format=CL).requires_grad_(), weight=torch.ones(16))
            assert _route_of(cl) == ("normlab" if fast_cpu and dtype == torch.bfloat16 else "torch")
        # the same values either way (torch's kernel or the engine, against the plain path)
        with fast_path(False):
            ref = NF.batch_norm(x, weight=torch.ones(16))
        torch.testing.assert_close(y.float(), ref.float(), atol=0.02, rtol=0.02)
    finally:
        _routing._ROUTES.clear()


@pytest.mark.parametrize("f16c", [True, False])
def test_float16_group_norms_run_the_engine_with_f16c_from_their_threshold(f16c, monkeypatch, kernel_mode):
    """Channel-first float16 group, layer and instance norm with backward: the engine from
    MIN_F16_GROUP_NUMEL values where the kernels convert with F16C, torch's group-norm kernel
    below it and without F16C; bfloat16 stays on torch's at any size. Same values as the plain
    path either way."""
    if kernel_mode != "c-kernels":
        pytest.skip("the choice is between the compiled kernels and torch's")
    monkeypatch.setattr(_kernels, "f16c", lambda: f16c)
    _routing._ROUTES.clear()
    big = torch.randn(8, 16, 48, 48)  # 295k values
    small = torch.randn(8, 16, 16, 16)  # 33k values
    assert small.numel() >= MIN_FAST_NUMEL and small.numel() < _routing.MIN_F16_GROUP_NUMEL <= big.numel()
    try:
        for dtype in (torch.float16, torch.bfloat16):
            for x in (big, small):
                x = x.to(dtype).requires_grad_()
                g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
                engine = dtype == torch.float16 and f16c and x.numel() == big.numel()
                for name, f in (("gn", lambda t: NF.group_norm(t, 4)), ("ln", lambda t: NF.layer_norm(t)),
                                ("in", lambda t: NF.instance_norm(t))):
                    with fast_path(None):
                        y = f(x)
                    assert _route_of(y) == ("normlab" if engine else "torch"), (name, dtype, x.shape)
                    y.backward(g)
                    gx, x.grad = x.grad, None
                    with fast_path(False):
                        ref = f(x)
                    ref.backward(g)
                    torch.testing.assert_close(y.float(), ref.float(), atol=0.02, rtol=0.02)
                    torch.testing.assert_close(gx.float(), x.grad.float(), atol=0.02, rtol=0.02)
                    x.grad = None
    finally:
        _routing._ROUTES.clear()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_instance_norm_takes_torchs_instance_kernel_in_float16(dtype, kernel_mode):
    """On the "torch" route a float16 instance norm from MIN_HALF_IN_KERNEL_NUMEL values runs
    torch's instance-norm kernel (batch norm over the (1, N C, ...) view), the other calls its
    group-norm kernel; both equal the plain path, with gradients."""
    big = torch.randn(4, 8, 64, 64, dtype=dtype)
    assert big.numel() >= _routing.MIN_HALF_IN_KERNEL_NUMEL
    for x, by_bn in ((big, dtype == torch.float16), (torch.randn(2, 3, 5, 5, dtype=dtype), False)):
        w = torch.rand(x.shape[1], requires_grad=True)
        b = torch.randn(x.shape[1], requires_grad=True)
        x.requires_grad_()
        with fast_path(None):
            y = NF.instance_norm(x, w, b)
        want = {"NativeBatchNormBackward0"} if by_bn else {"NativeGroupNormBackward0"}
        if _routing.route("in", x, 1, x.shape[1], (w.dtype, b.dtype), (True,)) == "torch":
            assert _nodes(y) & TORCH_NODES == want, x.shape
        g = torch.randn_like(y)
        got = torch.autograd.grad(y, (x, w, b), g)
        with fast_path(False):
            ref_y = NF.instance_norm(x, w, b)
        ref = torch.autograd.grad(ref_y, (x, w, b), g)
        tol = {"atol": 4e-3, "rtol": 4e-3} if dtype != torch.float32 else {"atol": 1e-4, "rtol": 1e-4}
        torch.testing.assert_close(y.float(), ref_y.float(), **tol)
        for a, r in zip(got, ref):
            torch.testing.assert_close(a.float(), r.float(), atol=tol["atol"] * 8, rtol=tol["rtol"] * 8)


@pytest.mark.parametrize("name", ["bn", "mobn", "brn", "bin", "sn"])
def test_process_group_routing(name, monkeypatch, kernel_mode):
    # a group that is not active (one process, or torch.distributed not initialized) keeps the
    # statistics local and takes the fast path; an active one takes the plain, synchronized
    # path, except batch norm and batch renorm on the compiled kernels (which synchronize there)
    import normlab.distributed as dist_mod

    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    call = {"bn": lambda g: NF.batch_norm(x, process_group=g),
            "mobn": lambda g: NF.mean_only_batch_norm(x, process_group=g),
            "brn": lambda g: NF.batch_renorm(x, torch.zeros(4), torch.ones(4), process_group=g),
            "bin": lambda g: NF.batch_instance_norm(x, torch.full((4,), 0.5), process_group=g),
            "sn": lambda g: NF.switchable_norm(x, torch.ones(3), torch.ones(3), process_group=g)}[name]
    with fast_path(True):
        assert _fast(call(None)) == _kernels.available()
        assert _fast(call(dist_mod.WORLD)) == _kernels.available()  # torch.distributed is not initialized here
        monkeypatch.setattr(dist_mod, "is_active", lambda group=None: True)
        monkeypatch.setattr(dist_mod, "all_reduce_moments", lambda local, group=None: local)  # no collective here
        assert _fast(call(dist_mod.WORLD)) == (name in ("bn", "brn") and kernel_mode == "c-kernels")
    assert engine.local_only(None)


@pytest.mark.parametrize("name", list(ENTRY))
def test_inputs_without_positions_take_the_plain_path_for_per_sample_statistics(name):
    # an (N, C) input has one value per (sample, channel): per-(n, c) statistics would be as
    # large as the input (measured 7-20x slower), so the automatic routing keeps those norms on
    # plain autograd; batch norm (per-channel statistics) keeps its fast path (torch's kernel)
    x = torch.randn(128, 4096, requires_grad=True)
    assert x.numel() >= LARGE_NUMEL
    if name in ("in", "bin"):
        pytest.skip("needs positions")
    with fast_path(None):
        if name == "bn":  # (batch norm: torch's own kernel, the faster one without positions)
            assert _route_of(ENTRY[name](x)) == "torch"
        else:
            assert _fast(ENTRY[name](x)) == (name in ("mobn", "brn") and _kernels.available())


def test_batch_norm_threshold_is_per_thread(kernel_mode):
    # the engine's fixed cost a call does not shrink with threads, torch's kernel does: batch norm
    # takes the engine from MIN_KERNEL_NUMEL values a thread on
    if kernel_mode != "c-kernels":
        pytest.skip("without compiled kernels batch norm always takes torch's kernel")
    x = torch.randn(4, 4, 256, 136, requires_grad=True)  # between 1x and 2x MIN_KERNEL_NUMEL
    assert _routing.MIN_KERNEL_NUMEL <= x.numel() < 2 * _routing.MIN_KERNEL_NUMEL
    before = torch.get_num_threads()
    try:
        with fast_path(None):
            torch.set_num_threads(1)
            assert _route_of(ENTRY["bn"](x)) == "normlab"
            torch.set_num_threads(2)
            assert _route_of(ENTRY["bn"](x)) == "torch"
    finally:
        torch.set_num_threads(before)
