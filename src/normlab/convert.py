"""Work on whole models: swap every norm for another spec, fold batch norm into the
preceding convolution or linear layer for inference, recompute running statistics."""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import torch
from torch import nn

from .layers.base import BatchStatNorm, Norm
from .registry import make_norm, parse_spec

__all__ = ["convert", "convert_sync", "fold_batchnorm", "recalibrate", "norm_signature"]

_TORCH_CHANNEL_FIRST = (
    nn.modules.batchnorm._BatchNorm,  # BatchNorm1d/2d/3d, SyncBatchNorm, the lazy ones
    nn.modules.instancenorm._InstanceNorm,
)


def norm_signature(module: nn.Module) -> tuple[int, int, float | None] | None:
    """``(num_features, channel_dim, eps)`` of a normalization layer, or None if ``module``
    is not one that ``convert`` can map (a LayerNorm over two or more trailing axes, say)."""
    if isinstance(module, Norm):
        return module.num_features, module.channel_dim, module.eps
    if isinstance(module, _TORCH_CHANNEL_FIRST):
        return module.num_features, 1, module.eps
    if isinstance(module, nn.GroupNorm):
        return module.num_channels, 1, module.eps
    if isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
        if len(module.normalized_shape) != 1:
            return None
        return module.normalized_shape[0], -1, module.eps
    return None


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (Norm, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm) + _TORCH_CHANNEL_FIRST)


@torch.no_grad()
def _carry_state(old: nn.Module, new: nn.Module, copy_affine: bool) -> None:
    """Copy affine parameters and running statistics where both layers have them, same shape."""
    names = ["running_mean", "running_var", "num_batches_tracked"]
    if copy_affine:
        names = ["weight", "bias"] + names
    for name in names:
        src, dst = getattr(old, name, None), getattr(new, name, None)
        if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
            dst.copy_(src)


def _replacement(old: nn.Module, spec: str, path: str, copy_affine: bool) -> nn.Module | None:
    sig = norm_signature(old)
    if sig is None:
        warnings.warn(f"normlab.convert: left {path or 'the model'} ({old!r}) in place: "
                      f"it normalizes over more than one trailing axis, which no spec maps to", stacklevel=3)
        return None
    num_features, channel_dim, eps = sig
    entry, _ = parse_spec(spec)
    kwargs: dict[str, Any] = {"channel_dim": channel_dim}
    if eps is not None:
        kwargs["eps"] = eps
    elif entry.name in ("rms", "rmsc"):
        kwargs["eps"] = None  # torch.nn.RMSNorm's eps=None: the dtype's machine epsilon
    new = make_norm(spec, num_features, **kwargs)
    ref = next(iter(old.parameters()), None)
    if ref is None:
        ref = next(iter(old.buffers()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
    _carry_state(old, new, copy_affine)
    from .layers.norm_act import carry_activation  # a norm + activation layer keeps its activation

    new = carry_activation(old, new)
    new.train(old.training)
    return new


def convert(model: nn.Module, spec: str, copy_affine: bool = True) -> nn.Module:
    """Replace every normalization layer in ``model`` with ``make_norm(spec, C)``.

    Recognized: torch's ``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``InstanceNorm1d/2d/3d``,
    ``GroupNorm``, ``LayerNorm`` and ``RMSNorm`` over one trailing axis (mapped as
    ``channel_dim=-1`` layers), and normlab's own layers. Each new layer keeps the old one's
    channel axis and eps (torch's ``eps=None`` included, for RMS targets), its affine
    parameters when ``copy_affine`` and the shapes agree, its running statistics when both
    have them, its device, dtype and train/eval mode. A norm that cannot be mapped is left
    in place with a warning that names it. Returns the model (the new layer if ``model``
    itself is a norm).

    ``"SPEC+ws"`` (``"gn:8+ws"``) also weight-standardizes the convolution feeding each norm;
    ``"cbn:k"`` wraps that convolution in a :class:`normlab.CrossIterationBatchNorm` (and
    raises, changing nothing, if some norm has no convolution right before it). See
    :mod:`normlab.conv_norm`.
    """
    parse_spec(spec)  # fail fast on an unknown spec, before touching the model
    from .conv_norm import convert_paired  # "gn:8+ws" and "cbn:4" need the conv before each norm

    model, done = convert_paired(model, spec, copy_affine, _is_norm)
    if done:
        return model
    if _is_norm(model):
        new = _replacement(model, spec, "", copy_affine)
        return model if new is None else new
    for path, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            if _is_norm(child):
                new = _replacement(child, spec, f"{path}.{name}" if path else name, copy_affine)
                if new is not None:
                    setattr(parent, name, new)
    _keep_transformers_on_their_norms(model)
    return model


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


# ------------------------------------------------------------------------- folding
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _bn_stats(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor, float] | None:
    """Running (mean, var, eps) of a channel-first batch norm that eval would use, or None."""
    from .layers.batch import BatchNorm

    if isinstance(bn, BatchNorm) and bn.channel_dim not in (1, -1):
        return None
    if not isinstance(bn, (BatchNorm, nn.modules.batchnorm._BatchNorm)):
        return None
    if bn.running_mean is None or bn.running_var is None:
        return None
    return bn.running_mean, bn.running_var, bn.eps


def _fits(layer: nn.Module, bn: nn.Module) -> bool:
    """The norm's channels are the layer's output channels: axis 1 of a convolution's
    output, the last axis of a linear layer's (axis 1 too when that output is (N, C))."""
    if bn.running_mean.shape[0] != layer.weight.shape[0]:
        return False
    return getattr(bn, "channel_dim", 1) == 1 or isinstance(layer, nn.Linear)


def _foldable_pairs(model: nn.Module) -> list[tuple[str, str]]:
    """(layer, norm) module paths where the norm's only input is the layer's output and the
    layer's output goes nowhere else; found by tracing, else from ``nn.Sequential`` order."""
    try:
        import torch.fx

        class _Tracer(torch.fx.Tracer):
            # normlab's layers validate inputs with Python branches: keep them opaque, as torch's
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return isinstance(m, Norm) or super().is_leaf_module(m, qualname)

        graph = _Tracer().trace(model)
    except Exception:  # untraceable (data-dependent control flow): fall back to Sequentials
        pairs = []
        for path, mod in model.named_modules():
            if isinstance(mod, nn.Sequential):
                kids = list(mod.named_children())
                for (a, la), (b, lb) in zip(kids, kids[1:]):
                    if isinstance(la, _FOLDABLE) and _bn_stats(lb) is not None and _fits(la, lb):
                        pre = f"{path}." if path else ""
                        pairs.append((pre + a, pre + b))
        return pairs
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or _bn_stats(modules[node.target]) is None:
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], _FOLDABLE)
            and len(src.users) == 1
            and _fits(modules[src.target], modules[node.target])
        ):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode batch norm into the preceding ``Conv1d/2d/3d`` or ``Linear``.

    With s = weight / sqrt(running_var + eps), the pair becomes one layer with
    ``W' = W * s`` (per output channel) and ``b' = (b - running_mean) * s + bias``
    (Ioffe & Szegedy 2015, Algorithm 2), and the norm is replaced by ``nn.Identity``. Only
    norms that use running statistics in eval are folded; call ``model.eval()`` first, as
    the folded model is an inference model. Returns the model, changed in place.
    """
    if model.training:
        raise ValueError("fold_batchnorm: call model.eval() first; folding bakes in the running statistics")
    modules = dict(model.named_modules())
    for layer_path, bn_path in _foldable_pairs(model):
        layer, bn = modules[layer_path], modules[bn_path]
        mean, var, eps = _bn_stats(bn)  # type: ignore[misc]
        scale = torch.rsqrt(var + eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
        w = layer.weight
        layer.weight.copy_(w * scale.view(-1, *([1] * (w.ndim - 1))).to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(w.dtype).clone())
        else:
            layer.bias.copy_(layer.bias * scale + shift)
        parent_path, _, name = bn_path.rpartition(".")
        setattr(modules[parent_path] if parent_path else model, name, nn.Identity())
    return model


# ------------------------------------------------------------------- recalibration
def _has_running_stats(m: nn.Module) -> bool:
    return getattr(m, "running_mean", None) is not None and hasattr(m, "reset_running_stats")


@torch.no_grad()
def recalibrate(model: nn.Module, batches: Iterable[Any]) -> nn.Module:
    """Recompute every layer's running statistics as the exact average over ``batches``.

    The "precise BN" practice: running statistics drift while weights change, so after
    training reset them and average the batch statistics of a fixed set of batches with
    the model frozen (``momentum=None``, the cumulative average). Only the normalization
    layers run in training mode, so dropout stays off. A batch may be a tensor or a tuple
    whose first item is the input. Returns the model in the mode it came in.
    """
    norms = [m for m in model.modules() if _has_running_stats(m)]
    was_training = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in norms}
    saved = {m: {k: v.clone() for k, v in m.named_buffers(recurse=False)} for m in norms}
    try:
        model.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        seen = 0
        for batch in batches:
            x = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(x)
            seen += 1
        if seen == 0:
            raise ValueError("recalibrate: no batches given")
    except BaseException:
        for m, bufs in saved.items():  # a failed recalibration leaves the statistics as they were
            for k, v in bufs.items():
                getattr(m, k).copy_(v)
        raise
    finally:
        for m, mom in momenta.items():
            m.momentum = mom
        for m, mode in was_training.items():
            m.training = mode
    return model


# ------------------------------------------------------------------ synchronization
def _sync_batchnorm(old: nn.modules.batchnorm._BatchNorm, process_group: Any) -> nn.Module:
    """A normlab ``BatchNorm`` with ``old``'s settings, state, device, dtype and mode, synchronized."""
    from .layers.batch import BatchNorm

    if isinstance(old, nn.modules.lazy.LazyModuleMixin) and old.has_uninitialized_params():
        raise ValueError(f"normlab.convert_sync: {old!r} is a lazy batch norm not yet initialized; "
                         f"run one forward pass (or give num_features) before converting")
    new = BatchNorm(old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
                    track_running_stats=old.track_running_stats, process_group=process_group)
    ref = next(iter(old.parameters()), None)
    if ref is None:
        ref = next(iter(old.buffers()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    _carry_state(old, new, copy_affine=True)
    new.train(old.training)
    return new


def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Synchronize the batch statistics of every batch-statistic norm in ``model`` over a group.

    normlab layers that take a ``process_group`` (batch norm, mean-only batch norm, batch
    renorm, batch-instance norm, switchable norm) get it set; torch's ``BatchNorm1d/2d/3d``
    and ``SyncBatchNorm`` are replaced by a synchronized :class:`normlab.BatchNorm` with the
    same eps, momentum, affine parameters, running statistics, device, dtype and mode.
    ``process_group=None`` means torch's default group, looked up at each call (so the model
    may be converted before ``torch.distributed.init_process_group``). Training then
    all-reduces the moments over the group; eval never communicates. Convert before wrapping
    the model in ``DistributedDataParallel`` (replaced layers are new parameters). Returns the
    model (the new layer if ``model`` itself is a torch batch norm).
    """
    from .distributed import WORLD, resolve_group

    group = WORLD if process_group is None else process_group
    resolve_group(group)  # reject a bad value before touching the model
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _sync_batchnorm(model, group)
    for module in list(model.modules()):
        if isinstance(module, BatchStatNorm):
            module.process_group = group
        for name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, name, _sync_batchnorm(child, group))
    return model
