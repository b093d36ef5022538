"""Find the normalization layers of a model, whoever wrote them, by what they compute.

A layer counts as a norm when it is one of torch's (``BatchNorm*d``, ``SyncBatchNorm``, the
lazy ones, ``InstanceNorm*d``, ``GroupNorm``, ``LayerNorm``, ``RMSNorm``) or normlab's, or
when its parameters and buffers have a norm's shape (torchvision's and timm's frozen batch
norms: ``running_mean``/``running_var`` buffers and an ``eps``; Hugging Face's and timm's RMS
norms: a ``weight`` and a ``variance_epsilon``/``eps``, no bias; layer norms written out: a
``weight``, a ``bias`` and an ``eps``). Whenever its ``forward`` is not torch's own (timm's
``LayerNorm2d`` subclasses ``nn.LayerNorm`` but normalizes axis 1; ``BatchNormAct2d`` adds an
activation) its behaviour decides: a copy runs in eval on a small input, once per possible
channel axis, against the norm it claims to be (followed by its own ``drop`` and ``act``
modules, which then travel with the converted layer). What matches nothing is reported
with the reason and never changed.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.nn import functional as TF

from . import layers as L

__all__ = ["FoundNorm", "find_norms", "recognize"]

# normlab's layers and the spec each is
_NORMLAB_KINDS: dict[type, str] = {
    L.BatchNorm: "bn", L.MeanOnlyBatchNorm: "mobn", L.BatchRenorm: "brn", L.BatchInstanceNorm: "bin",
    L.SwitchableNorm: "sn", L.LayerNorm: "ln", L.ChannelLayerNorm: "lnc", L.InstanceNorm: "in",
    L.GroupNorm: "gn", L.RMSNorm: "rms", L.ChannelRMSNorm: "rmsc", L.OnlineNorm: "on",
    L.FrozenBatchNorm: "frozenbn",
}
_WRAPPER_CHILDREN = {"act", "drop"}  # timm's *Act layers: norm, then drop, then act


@dataclass
class FoundNorm:
    """One normalization layer of a model and what it computes.

    ``kind`` is the spec that computes the same (``bn``, ``gn:4``, ``lnc``, ...);
    ``options`` the settings a conversion carries (momentum, track_running_stats, affine,
    bias); ``act``/``drop`` the modules it applies after normalizing; ``problem`` why it
    cannot be converted (None when it can).
    """

    path: str
    module: nn.Module
    kind: str
    num_features: int = 0
    channel_dim: int = 1
    eps: float | None = None
    options: dict[str, Any] = field(default_factory=dict)
    act: nn.Module | None = None
    drop: nn.Module | None = None
    problem: str | None = None
    inner: nn.Module | None = None  # the norm inside ``module`` when that is a wrapper (NormAct)

    @property
    def state(self) -> nn.Module:
        """The module holding the parameters and running statistics."""
        return self.inner if self.inner is not None else self.module

    @property
    def layout(self) -> str:
        return "(N, C, *)" if self.channel_dim == 1 else f"channel_dim={self.channel_dim}"


def find_norms(model: nn.Module) -> list[FoundNorm]:
    """Every norm in ``model`` (the model itself included), outermost first; a module shared
    by several parents is listed once, under its first path; a norm's own children are not
    searched."""
    found: list[FoundNorm] = []
    seen: set[int] = set()

    def walk(mod: nn.Module, path: str) -> None:
        if id(mod) in seen:
            return
        seen.add(id(mod))
        f = recognize(mod, path)
        if f is not None:
            found.append(f)
            return
        for name, child in mod.named_children():
            walk(child, f"{path}.{name}" if path else name)

    walk(model, "")
    return found


def recognize(module: nn.Module, path: str = "") -> FoundNorm | None:
    """What norm ``module`` is (a :class:`FoundNorm`, maybe with a ``problem``), or None if it
    is not a normalization layer."""
    if isinstance(module, L.NormAct):
        inner = recognize(module.norm, path)
        if inner is None:
            return None
        inner.module, inner.inner, inner.act, inner.drop = module, module.norm, module.act, module.drop
        return inner
    if isinstance(module, L.Norm):
        return _normlab(module, path)
    for base, how in _TORCH_BASES:
        if isinstance(module, base):
            return how(module, path)
    return _foreign(module, path)


# ---------------------------------------------------------------------- normlab's own
def _affine_options(m: nn.Module, affine: bool) -> dict[str, Any]:
    return {"affine": affine, "bias": not affine or getattr(m, "bias", None) is not None}


_NOT_OPTIONS = {"self", "num_features", "eps", "channel_dim", "device", "dtype", "num_groups"}


def _constructor_options(m: nn.Module) -> dict[str, Any]:
    """Every keyword of ``type(m)``'s constructor chain that ``m`` keeps as an attribute of
    that name (``r_max``, ``warmup_steps``, ``alpha_fwd``, ``process_group``, ...)."""
    import inspect

    opts: dict[str, Any] = {}
    for klass in type(m).__mro__:
        if "__init__" in vars(klass) and issubclass(klass, L.Norm):
            for name, p in inspect.signature(klass.__init__).parameters.items():
                if name not in _NOT_OPTIONS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and hasattr(m, name):
                    opts.setdefault(name, getattr(m, name))
    return opts


def _normlab(m: L.Norm, path: str) -> FoundNorm:
    kind = _NORMLAB_KINDS.get(type(m), type(m).__name__)
    if kind == "gn":
        kind = f"gn:{m.num_groups}"
    opts = {**_constructor_options(m), **_affine_options(m, m.affine)}
    if not m.has_bias:
        opts.pop("bias")
    act = getattr(m, "act", None)  # a fused activation (``make_norm(..., act=...)``) travels with it
    return FoundNorm(path, m, kind, m.num_features, m.channel_dim, m.eps, opts,
                     act=act if isinstance(act, nn.Module) else None)


# ---------------------------------------------------------------------- torch's, and subclasses
def _torch_base(m: nn.Module) -> type:
    """The first class in ``m``'s MRO that torch defines (whose forward is torch's own)."""
    return next(c for c in type(m).__mro__ if c.__module__.startswith("torch.nn"))


def _channel_hypotheses(own_dim: int) -> list[int]:
    return [own_dim, 1 if own_dim == -1 else -1]


def _from_torch(m: nn.Module, path: str, kind: str, c: int, own_dim: int, eps: float | None,
                opts: dict[str, Any], dims: list[int] | None = None) -> FoundNorm:
    """A torch norm class (``own_dim``: its channel axis); a subclass that overrides forward or
    holds children is checked by behaviour against the torch class's forward."""
    f = FoundNorm(path, m, kind, c, own_dim, eps, opts)
    base = _torch_base(m)
    children = dict(m.named_children())
    if type(m).forward is base.forward and not children:
        return f
    if set(children) - _WRAPPER_CHILDREN:
        f.problem = f"it holds submodules {sorted(set(children) - _WRAPPER_CHILDREN)} that convert cannot carry"
        return f

    def reference(cd: int) -> Callable[[nn.Module, Tensor], Tensor]:
        if cd == own_dim:
            return lambda mod, x: base.forward(mod, x)
        return lambda mod, x: base.forward(mod, x.movedim(cd, own_dim)).movedim(own_dim, cd)

    return _settle(f, [(cd, reference(cd)) for cd in (dims or _channel_hypotheses(own_dim))],
                   f"{base.__name__} over axis 1 or -1")


def _batch(m: nn.modules.batchnorm._BatchNorm, path: str) -> FoundNorm:
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return FoundNorm(path, m, "bn", problem="a lazy batch norm not yet initialized (run one forward pass first)")
    opts = {"momentum": m.momentum, "track_running_stats": m.track_running_stats, **_affine_options(m, m.affine)}
    return _from_torch(m, path, "bn", m.num_features, 1, m.eps, opts, dims=[1])


def _instance(m: nn.modules.instancenorm._InstanceNorm, path: str) -> FoundNorm:
    if isinstance(m, nn.modules.lazy.LazyModuleMixin) and m.has_uninitialized_params():
        return FoundNorm(path, m, "in", problem="a lazy instance norm not yet initialized (run one forward pass first)")
    opts = {"momentum": m.momentum, "track_running_stats": m.track_running_stats, **_affine_options(m, m.affine)}
    return _from_torch(m, path, "in", m.num_features, 1, m.eps, opts, dims=[1])


def _group(m: nn.GroupNorm, path: str) -> FoundNorm:
    return _from_torch(m, path, f"gn:{m.num_groups}", m.num_channels, 1, m.eps, _affine_options(m, m.affine), dims=[1])


def _trailing(m: nn.LayerNorm | nn.RMSNorm, path: str, kind: str) -> FoundNorm:
    if len(m.normalized_shape) != 1:
        return FoundNorm(path, m, kind, problem=f"it normalizes over {len(m.normalized_shape)} trailing axes "
                                                f"{tuple(m.normalized_shape)}, which no spec maps to")
    opts = _affine_options(m, m.elementwise_affine)
    if kind == "rmsc":
        opts.pop("bias")
    return _from_torch(m, path, kind, m.normalized_shape[0], -1, m.eps, opts)


_TORCH_BASES: list[tuple[type, Callable[[Any, str], FoundNorm]]] = [
    (nn.modules.batchnorm._BatchNorm, _batch),
    (nn.modules.instancenorm._InstanceNorm, _instance),
    (nn.GroupNorm, _group),
    (nn.LayerNorm, lambda m, p: _trailing(m, p, "lnc")),
    (nn.RMSNorm, lambda m, p: _trailing(m, p, "rmsc")),
]


# ---------------------------------------------------------------------- others', by shape
def _eps_of(m: nn.Module) -> float | None:
    for name in ("eps", "variance_epsilon", "epsilon"):
        v = getattr(m, name, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
    return None


def _vector(t: Any) -> int | None:
    return t.shape[0] if isinstance(t, Tensor) and t.ndim == 1 else None


def _foreign(m: nn.Module, path: str) -> FoundNorm | None:
    """A module of another library shaped like a norm (see the module docstring), or None."""
    if set(dict(m.named_children())) - _WRAPPER_CHILDREN:
        return None
    eps = _eps_of(m)
    if eps is None:
        return None
    params = dict(m.named_parameters(recurse=False))
    buffers = {k: v for k, v in m.named_buffers(recurse=False) if v is not None}
    if not params and {"running_mean", "running_var"} <= set(buffers):  # torchvision's / timm's frozen batch norm
        c = _vector(buffers["running_mean"])
        w, b = getattr(m, "weight", None), getattr(m, "bias", None)
        if c is None or any(_vector(t) not in (None, c) for t in (w, b)):
            return None
        f = FoundNorm(path, m, "frozenbn", c, 1, eps, {"affine": w is not None, "bias": w is None or b is not None})
        ref = lambda mod, x: TF.batch_norm(x, mod.running_mean, mod.running_var, mod.weight, mod.bias, False, 0.0,
                                           mod.eps)
        return _settle(f, [(1, ref)], "frozen batch norm over axis 1")
    names = set(params) | set(buffers)
    w = params.get("weight")
    shape = getattr(m, "normalized_shape", None)
    c = _vector(w) if w is not None else (shape[0] if isinstance(shape, (tuple, list)) and len(shape) == 1 else None)
    if c is None:
        return None
    if names <= {"weight"}:  # Hugging Face's LlamaRMSNorm, T5LayerNorm, ...; timm's RmsNorm(2d)
        f = FoundNorm(path, m, "rmsc", c, -1, eps, {"affine": w is not None})
        return _settle(f, [(cd, _rms_reference(cd)) for cd in (-1, 1)], "RMS norm over axis -1 or 1")
    if names == {"weight", "bias"} and _vector(params.get("bias")) == c:  # a layer norm written out
        f = FoundNorm(path, m, "lnc", c, -1, eps, {"affine": True, "bias": True})
        ref = lambda cd: lambda mod, x: TF.layer_norm(x.movedim(cd, -1), (c,), mod.weight, mod.bias,
                                                       eps).movedim(-1, cd)
        return _settle(f, [(cd, ref(cd)) for cd in (-1, 1)], "layer norm over axis -1 or 1")
    return None


def _rms_reference(cd: int) -> Callable[[nn.Module, Tensor], Tensor]:
    def ref(mod: nn.Module, x: Tensor) -> Tensor:
        xf = x.float()
        y = (xf * torch.rsqrt(xf.square().mean(cd, keepdim=True) + _eps_of(mod))).to(x.dtype)  # type: ignore[operator]
        w = getattr(mod, "weight", None)
        if w is None:
            return y
        shape = [1] * x.ndim
        shape[cd] = -1
        return y * w.view(shape)

    return ref


# ---------------------------------------------------------------------- the behaviour check
def _probe_dtype(m: nn.Module) -> tuple[torch.dtype, torch.device]:
    for t in list(m.parameters()) + list(m.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.get_default_dtype(), torch.device("cpu")


def _settle(f: FoundNorm, hypotheses: list[tuple[int, Callable[[nn.Module, Tensor], Tensor]]],
            expected: str) -> FoundNorm:
    """Run a copy of ``f.module`` in eval on small inputs; the first channel axis at which it
    computes its reference (then its own ``drop`` and ``act``) is its layout."""
    dtype, device = _probe_dtype(f.module)
    tol = {torch.float64: 1e-7, torch.float32: 1e-4}.get(dtype, 3e-2)
    mod = copy.deepcopy(f.module).eval()
    gen = torch.Generator().manual_seed(0)
    for cd, reference in hypotheses:
        for positions in ((3, 5), (7,)):
            shape = [2, *positions]
            shape.insert(len(shape) if cd == -1 else 1, f.num_features)
            x = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 0.5).to(dtype=dtype, device=device)
            try:
                with torch.no_grad():
                    got = mod.forward(x.clone())  # not __call__: no user hooks run
                    want = reference(mod, x.clone())
                    for name in ("drop", "act"):
                        if isinstance(getattr(mod, name, None), nn.Module):
                            want = getattr(mod, name)(want)
                    same = isinstance(got, Tensor) and got.shape == want.shape and torch.allclose(
                        got, want, rtol=tol, atol=tol)
            except Exception:  # this layout is not the one it takes (or a meta tensor): try the next
                continue
            if same:
                f.channel_dim = cd
                f.act, f.drop = getattr(f.module, "act", None), getattr(f.module, "drop", None)
                return f
            break
    wrapped = any(isinstance(getattr(f.module, n, None), nn.Module) for n in _WRAPPER_CHILDREN)
    f.problem = f"its output matches no {expected}" + (", then its own drop and act" if wrapped else "")
    return f
