"""Swap the norms of a whole model: ``convert`` to another spec, ``freeze``/``unfreeze``
batch norm, and ``inspect`` what a model holds and what conversion would do.

Every swap is all or nothing: each replacement is planned (built, with its options and
state) and checked first; only when every one succeeded are they put in place.
"""

from __future__ import annotations

import inspect as _pyinspect
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ._recognize import FoundNorm, find_norms
from .layers import NormAct
from .layers.norm_act import fusable_activation, with_activation
from .registry import make_norm, parse_spec

__all__ = ["convert", "freeze", "unfreeze", "inspect", "NormReport"]

# running statistics mean the same within a family, so they (and momentum and
# track_running_stats) travel only between its members
_STATS_FAMILY = {"bn": "batch", "brn": "batch", "mobn": "batch", "bin": "batch", "sn": "batch",
                 "frozenbn": "batch", "in": "instance"}
_STATS_OPTIONS = ("momentum", "track_running_stats")
_FREEZABLE = ("bn", "brn")  # norms whose eval is batch norm's expression of the running statistics


def _family(kind: str) -> str | None:
    return _STATS_FAMILY.get(kind.partition(":")[0])


def _accepts(cls: type, name: str) -> bool:
    """Whether ``cls(...)`` takes keyword ``name``, following ``**kwargs`` up the MRO."""
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        params = _pyinspect.signature(klass.__init__).parameters
        p = params.get(name)
        if p is not None and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            return True
        if not any(q.kind is q.VAR_KEYWORD for q in params.values()):
            return False
    return False


def _dtype_device(module: nn.Module, fallback: tuple[torch.dtype, torch.device]) -> tuple[torch.dtype, torch.device]:
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return fallback


@torch.no_grad()
def carry_state(old: nn.Module, new: nn.Module, copy_affine: bool = True, stats: bool = True) -> None:
    """Copy ``weight``/``bias`` (when ``copy_affine``) and the running statistics (when
    ``stats``) where both layers have them with one shape, and each parameter's requires_grad."""
    names = ["weight", "bias"] if copy_affine else []
    if stats:
        names += ["running_mean", "running_var", "num_batches_tracked"]
    if type(old) is type(new):  # a layer of its own kind: all of its state (rho, mixing weights, ...)
        own = [k for k, _ in list(old.named_parameters(recurse=False)) + list(old.named_buffers(recurse=False))]
        names += [k for k in own if k not in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")]
    for name in names:
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
            dst.copy_(src)
            if isinstance(src, nn.Parameter) and isinstance(dst, nn.Parameter):
                dst.requires_grad_(src.requires_grad)


def _build(f: FoundNorm, spec: str, copy_affine: bool, fallback: tuple[torch.dtype, torch.device],
           **extra: Any) -> nn.Module:
    """The layer ``spec`` makes of ``f``, carrying every option and state it can take."""
    entry, _ = parse_spec(spec)
    base: dict[str, Any] = {"channel_dim": f.channel_dim, **extra}
    if f.eps is not None:
        base["eps"] = f.eps
    elif entry.name in ("rms", "rmsc"):
        base["eps"] = None  # torch.nn.RMSNorm's eps=None: the dtype's machine epsilon
    stats = _family(f.kind) is not None and _family(f.kind) == _family(entry.name)
    if entry.name == "frozenbn" and not (stats and getattr(f.state, "running_mean", None) is not None
                                         and getattr(f.state, "running_var", None) is not None):
        raise ValueError("a frozen batch norm needs running statistics to freeze, and this layer keeps none "
                         "(track_running_stats=False, or not a batch norm)")
    wanted = {k: v for k, v in f.options.items() if stats or k not in _STATS_OPTIONS}
    if wanted.get("bias", False):
        wanted.pop("bias")  # a layer with a bias, or one that has no notion of it: the target's default
    cls = type(make_norm(spec, f.num_features, **base))
    new = make_norm(spec, f.num_features, **base, **{k: v for k, v in wanted.items() if _accepts(cls, k)})
    dtype, device = _dtype_device(f.state, fallback)
    new = new.to(device=device, dtype=dtype)
    carry_state(f.state, new, copy_affine, stats)
    new.train(f.module.training)
    if f.act is not None or f.drop is not None:
        new = keep_activation(new, f.act, f.drop).train(f.module.training)
    return new


def keep_activation(new: nn.Module, act: nn.Module | None, drop: nn.Module | None) -> nn.Module:
    """``new`` followed by the activation (and dropout) of the layer it replaces: fused into
    ``new`` (one layer, ``make_norm(..., act=...)``) where it is a plain relu, leaky_relu, silu
    or exact gelu with no dropout and ``new`` is a normlab norm, else a :class:`NormAct` holding
    the same modules."""
    act = None if isinstance(act, nn.Identity) else act
    drop = None if isinstance(drop, nn.Identity) else drop
    named = fusable_activation(act) if act is not None and drop is None else None
    if named is not None and getattr(new, "act", None) is None:
        try:
            return with_activation(new, *named)
        except ValueError:  # not a normlab norm: keep the modules
            pass
    return NormAct(new, drop, act)


def plan(model: nn.Module, spec: str, copy_affine: bool, select: Callable[[FoundNorm], bool],
          who: str, **extra: Any) -> tuple[dict[int, nn.Module], list[FoundNorm]]:
    """Build every replacement (id of the old module -> new module); raise one error naming
    every one that fails, before anything is changed. Also returns the norms left alone
    because they cannot be mapped."""
    parse_spec(spec)  # an unknown spec fails before the model is looked at
    found = [f for f in find_norms(model) if select(f)]
    fallback = _dtype_device(model, (torch.get_default_dtype(), torch.device("cpu")))
    built: dict[int, nn.Module] = {}
    errors = []
    for f in found:
        if f.problem is not None:
            continue
        try:
            built[id(f.module)] = _build(f, spec, copy_affine, fallback, **extra)
        except (ValueError, TypeError, RuntimeError) as err:
            errors.append(f"{f.path or '(the model itself)'} ({type(f.module).__name__}, {f.num_features} channels): {err}")
    if errors:
        raise ValueError(f"{who}: {len(errors)} of {len(found)} norm layers cannot become {spec!r}; "
                         f"the model is unchanged:\n  " + "\n  ".join(errors))
    return built, [f for f in found if f.problem is not None]


def swap(model: nn.Module, built: dict[int, nn.Module], left: list[FoundNorm], who: str) -> nn.Module:
    if left:
        warnings.warn(f"{who}: {len(left)} norm layer(s) cannot be mapped: " + "; ".join(
            f"left {f.path or '(the model itself)'} ({f.module!r}) in place: {f.problem}" for f in left), stacklevel=3)
    if id(model) in built:
        return built[id(model)]
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # every name, a shared module's too
            if id(child) in built:
                setattr(parent, name, built[id(child)])
    _keep_transformers_on_their_norms(model)
    return model


def convert(model: nn.Module, spec: str, copy_affine: bool = True) -> nn.Module:
    """Replace every normalization layer in ``model`` with the layer ``spec`` names.

    Finds torch's norms, normlab's, torchvision's and timm's (frozen batch norms, channel-first
    layer norms, the ``*Act`` layers) and Hugging Face's RMS norms, by behaviour (see
    ``normlab.inspect``). Each new layer takes the old one's channel axis, eps (torch's
    ``eps=None`` for RMS targets), affine/bias settings, device, dtype, train/eval mode, its
    ``weight``/``bias`` when ``copy_affine`` and the shapes agree (with each parameter's
    ``requires_grad``); between norms with running statistics of one family (batch norm,
    batch renorm, mean-only, batch-instance, switchable, frozen batch norm; instance norm)
    also ``momentum``, ``track_running_stats`` and the running buffers. A layer that applies
    an activation (timm's ``BatchNormAct2d``) becomes a :class:`normlab.layers.NormAct` with
    the same drop and activation modules. Converting to a layer's own kind changes nothing
    it computes.

    All or nothing: every replacement is built first; if any fails (a channel count that
    ``gn:8`` does not divide, say) one ``ValueError`` names every failing module path and
    why, and the model is unchanged. Norms that cannot be mapped are left in place and
    named in one warning. Returns the model (the new layer if ``model`` itself is a norm).
    """
    from ._recognize import recognize
    from .conv_norm import convert_paired  # "gn:8+ws" and "cbn:4" need the conv before each norm

    parse_spec(spec)  # an unknown spec fails before the model is looked at
    model, done = convert_paired(model, spec, copy_affine, lambda m: recognize(m) is not None)
    if done:
        return model
    built, left = plan(model, spec, copy_affine, lambda f: True, "normlab.convert")
    return swap(model, built, left, "normlab.convert")


def _kinds(spec: str) -> set[str]:
    return {s.strip().lower() for s in spec.split(",") if s.strip()}


def freeze(model: nn.Module, spec: str = "bn") -> nn.Module:
    """Replace every norm of the kinds in ``spec`` (``"bn"``: every batch norm, torch's
    ``BatchNorm*d``/``SyncBatchNorm``, timm's ``BatchNormAct2d``, normlab's; ``"bn,brn"``
    adds batch renorm) with a :class:`normlab.layers.FrozenBatchNorm` holding its running
    statistics and affine map: eval behaviour in training too, whatever a later
    ``model.train()`` does, and no parameters left for an optimizer. All or nothing, as
    :func:`convert`. Returns the model (the new layer if ``model`` itself is a norm)."""
    kinds = _kinds(spec)
    bad = kinds - set(_FREEZABLE)
    if bad or not kinds:
        raise ValueError(f"normlab.freeze: spec {spec!r}: only norms whose eval uses the running statistics alone "
                         f"can be frozen ({', '.join(_FREEZABLE)}), got {sorted(bad) or 'nothing'}")
    select = lambda f: f.kind in kinds  # noqa: E731
    built, left = plan(model, "frozenbn", True, select, "normlab.freeze")
    return swap(model, built, left, "normlab.freeze")


def unfreeze(model: nn.Module, spec: str = "bn") -> nn.Module:
    """Replace every frozen batch norm (normlab's, torchvision's ``FrozenBatchNorm2d``, timm's
    ``FrozenBatchNorm2d``/``FrozenBatchNormAct2d``) with ``spec`` (batch norm by default),
    carrying its running statistics and affine map (now trainable parameters). All or
    nothing, as :func:`convert`. Returns the model (the new layer if ``model`` is one)."""
    built, left = plan(model, spec, True, lambda f: f.kind == "frozenbn", "normlab.unfreeze")
    return swap(model, built, left, "normlab.unfreeze")


@dataclass(frozen=True)
class NormReport:
    """One row of :func:`inspect`."""

    path: str
    type: str  # the class, with its module
    kind: str  # the spec that computes the same, e.g. "bn", "gn:8", "lnc"
    layout: str
    num_features: int
    action: str  # what convert does with it

    def __str__(self) -> str:
        return f"{self.path or '(model)'}  {self.type}  {self.kind}  {self.layout}  C={self.num_features}  {self.action}"


def inspect(model: nn.Module, spec: str | None = None) -> list[NormReport]:
    """Every norm layer ``convert`` finds in ``model``: its path, class, kind (the spec that
    computes the same), layout, channel count and what ``convert(model, spec)`` would make
    of it (the new layer, the error, or why it is left in place); without ``spec``, what
    conversion would carry. Changes nothing."""
    if spec is not None:
        parse_spec(spec)
    fallback = _dtype_device(model, (torch.get_default_dtype(), torch.device("cpu")))
    rows = []
    for f in find_norms(model):
        if f.problem is not None:
            action = f"left in place: {f.problem}"
        elif spec is None:
            opts = ", ".join(f"{k}={v}" for k, v in f.options.items())
            act = f", then {type(f.act).__name__}" if f.act is not None else ""
            action = f"convertible (eps={f.eps}, {opts}{act})"
        else:
            try:
                action = f"-> {_build(f, spec, True, fallback)!r}".replace("\n", " ")
            except (ValueError, TypeError, RuntimeError) as err:
                action = f"error: {err}"
        cls = type(f.module)
        rows.append(NormReport(f.path, f"{cls.__module__}.{cls.__qualname__}", f.kind, f.layout, f.num_features,
                               action))
    return rows


def _no_fast_path(module: nn.Module, args: Any) -> None:
    """A no-op forward pre-hook; its presence turns off torch's transformer fast path."""
    return None


def _keep_transformers_on_their_norms(model: nn.Module) -> None:
    """Make torch's transformer encoder layers call their (converted) norms.

    In eval under ``no_grad``, ``nn.TransformerEncoderLayer`` runs a fused kernel that
    applies a layer norm with ``norm1.weight``/``bias`` and never calls ``norm1``: after a
    conversion to ``bn`` it would silently compute layer norm, and to ``rmsc`` (no bias) it
    fails. A forward pre-hook is the per-layer switch torch offers to skip that kernel; the
    encoder's nested-tensor path (which feeds the layers nested tensors) is turned off too.
    """
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoderLayer) and not all(
            type(n) is nn.LayerNorm for n in (m.norm1, m.norm2)
        ):
            if _no_fast_path not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_no_fast_path)
    for m in model.modules():  # after the layers: an encoder comes before them in modules()
        if isinstance(m, nn.TransformerEncoder) and any(
            _no_fast_path in layer._forward_pre_hooks.values() for layer in m.layers
        ):
            m.use_nested_tensor = False
