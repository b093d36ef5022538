"""Work on whole models: swap every norm for another spec (``convert``, ``freeze``,
``unfreeze``, ``inspect``: in :mod:`normlab.swap`), fold batch norm into the preceding
convolution or linear layer for inference, recompute running statistics, synchronize."""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn

from ._recognize import FoundNorm, find_norms
from .functional.frozen import frozen_scale_shift
from .layers import NormAct
from .layers.base import BatchStatNorm, Norm
from .swap import convert, freeze, inspect, plan, swap, unfreeze

__all__ = ["convert", "convert_sync", "fold_batchnorm", "freeze", "inspect", "recalibrate", "unfreeze"]

# ------------------------------------------------------------------------- folding
_FOLDABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


def _foldable_norms(model: nn.Module) -> dict[int, FoundNorm]:
    """id -> the norms of ``model`` whose eval is batch norm's expression of fixed running
    statistics (batch norms of torch, normlab and timm, frozen batch norms), channel-first
    or channel-last."""
    out = {}
    for f in find_norms(model):
        bn = f.state
        if (f.problem is None and f.kind in ("bn", "frozenbn") and f.channel_dim in (1, -1)
                and getattr(bn, "running_mean", None) is not None and getattr(bn, "running_var", None) is not None):
            out[id(f.module)] = f
    return out


def _fits(layer: nn.Module, f: FoundNorm) -> bool:
    """The norm's channels are the layer's output channels: axis 1 of a convolution's
    output, the last axis of a linear layer's (axis 1 too when that output is (N, C))."""
    if f.num_features != layer.weight.shape[0]:
        return False
    return f.channel_dim == 1 or isinstance(layer, nn.Linear)


def _foldable_pairs(model: nn.Module, norms: dict[int, FoundNorm]) -> list[tuple[str, str]]:
    """(layer, norm) module paths where the norm's only input is the layer's output and the
    layer's output goes nowhere else; found by tracing, else from ``nn.Sequential`` order."""
    try:
        import torch.fx

        class _Tracer(torch.fx.Tracer):
            # normlab's layers validate inputs with Python branches, and other libraries' norms
            # (timm's BatchNormAct2d) are norms too: keep them opaque, as torch's
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return isinstance(m, Norm) or id(m) in norms or super().is_leaf_module(m, qualname)

        graph = _Tracer().trace(model)
    except Exception:  # untraceable (data-dependent control flow): fall back to Sequentials
        pairs = []
        for path, mod in model.named_modules():
            if isinstance(mod, nn.Sequential):
                kids = list(mod.named_children())
                for (a, la), (b, lb) in zip(kids, kids[1:]):
                    if isinstance(la, _FOLDABLE) and id(lb) in norms and _fits(la, norms[id(lb)]):
                        pre = f"{path}." if path else ""
                        pairs.append((pre + a, pre + b))
        return pairs
    modules = dict(model.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or id(modules[node.target]) not in norms:
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node)
            and src.op == "call_module"
            and isinstance(modules[src.target], _FOLDABLE)
            and len(src.users) == 1
            and _fits(modules[src.target], norms[id(modules[node.target])])
        ):
            pairs.append((src.target, node.target))
    return pairs


@torch.no_grad()
def fold_batchnorm(model: nn.Module) -> nn.Module:
    """Fold eval-mode batch norm into the preceding ``Conv1d/2d/3d`` or ``Linear``.

    With s = weight / sqrt(running_var + eps), the pair becomes one layer with
    ``W' = W * s`` (per output channel) and ``b' = (b - running_mean) * s + bias``
    (Ioffe & Szegedy 2015, Algorithm 2), and the norm is replaced by ``nn.Identity`` (by
    its own dropout and activation, for timm's ``BatchNormAct2d`` and normlab's
    ``NormAct``). Only norms that use running statistics in eval are folded (batch norms,
    frozen batch norms); call ``model.eval()`` first, as the folded model is an inference
    model. Returns the model, changed in place.
    """
    if model.training:
        raise ValueError("fold_batchnorm: call model.eval() first; folding bakes in the running statistics")
    modules = dict(model.named_modules())
    norms = _foldable_norms(model)
    for layer_path, bn_path in _foldable_pairs(model, norms):
        layer, f = modules[layer_path], norms[id(modules[bn_path])]
        bn = f.state
        scale, shift = frozen_scale_shift(bn.running_mean, bn.running_var, bn.weight, bn.bias, bn.eps)
        w = layer.weight
        layer.weight.copy_(w * scale.view(-1, *([1] * (w.ndim - 1))).to(w.dtype))
        if layer.bias is None:
            layer.bias = nn.Parameter(shift.to(w.dtype).clone())
        else:
            layer.bias.copy_(layer.bias * scale + shift)
        parent_path, _, name = bn_path.rpartition(".")
        rest = nn.Identity() if f.act is None and f.drop is None else NormAct(nn.Identity(), f.drop, f.act)
        setattr(modules[parent_path] if parent_path else model, name, rest)
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
def convert_sync(model: nn.Module, process_group: Any = None) -> nn.Module:
    """Synchronize the batch statistics of every batch-statistic norm in ``model`` over a group.

    normlab layers that take a ``process_group`` (batch norm, mean-only batch norm, batch
    renorm, batch-instance norm, switchable norm) get it set; torch's ``BatchNorm1d/2d/3d``
    and ``SyncBatchNorm`` (timm's ``BatchNormAct2d`` too, keeping its activation) are replaced
    by a synchronized :class:`normlab.BatchNorm` with every option and state carried, as
    :func:`convert` does, all or nothing.
    ``process_group=None`` means torch's default group, looked up at each call (so the model
    may be converted before ``torch.distributed.init_process_group``). Training then
    all-reduces the moments over the group; eval never communicates. Convert before wrapping
    the model in ``DistributedDataParallel`` (replaced layers are new parameters). Returns the
    model (the new layer if ``model`` itself is a torch batch norm).
    """
    from .distributed import WORLD, resolve_group

    group = WORLD if process_group is None else process_group
    resolve_group(group)  # reject a bad value before touching the model
    who = "normlab.convert_sync"
    foreign_bn = lambda f: f.kind == "bn" and not isinstance(f.state, Norm)  # noqa: E731
    built, left = plan(model, "bn", True, foreign_bn, who, process_group=group)
    if left:  # a batch norm left unsynchronized would silently compute local statistics
        raise ValueError(f"{who}: cannot synchronize " + "; ".join(
            f"{f.path or '(the model itself)'} ({f.module!r}): {f.problem}" for f in left))
    for module in model.modules():
        if isinstance(module, BatchStatNorm):
            module.process_group = group
    return swap(model, built, [], who)
