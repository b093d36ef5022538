"""Conversions that need the convolution before each norm: ``convert(model, "gn:8+ws")``
(standardize that convolution's weight) and ``convert(model, "cbn:4")`` (wrap it in a
cross-iteration batch norm). ``normlab.convert`` hands these specs here."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .registry import parse_spec, split_ws

__all__ = ["conv_norm_pairs", "convert_paired"]

_CONV = nn.modules.conv._ConvNd


def _is_cbn(spec: str) -> bool:
    return spec.strip().lower().partition(":")[0] == "cbn"


def conv_norm_pairs(model: nn.Module, is_norm: Any) -> tuple[list[tuple[str, str]], list[str]]:
    """(conv path, norm path) for every norm whose only input is a (non-transposed) conv's
    output used nowhere else, and the paths of the norms that have no such conv.

    Found by tracing with ``torch.fx`` (norms kept opaque); an untraceable model falls back
    to consecutive children of ``nn.Sequential`` containers.
    """
    modules = dict(model.named_modules())
    norms = [p for p, m in modules.items() if p and is_norm(m)]
    pairs: list[tuple[str, str]] = []
    try:
        import torch.fx

        class _Tracer(torch.fx.Tracer):
            def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
                return is_norm(m) or super().is_leaf_module(m, qualname)

        graph = _Tracer().trace(model)
        for node in graph.nodes:
            if node.op != "call_module" or not is_norm(modules[node.target]):
                continue
            src = node.args[0] if node.args else None
            if (isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
                    and isinstance(modules[src.target], _CONV) and not modules[src.target].transposed):
                pairs.append((src.target, node.target))
    except Exception:  # data-dependent control flow: consecutive children of Sequentials
        for path, mod in modules.items():
            if isinstance(mod, nn.Sequential):
                kids = list(mod.named_children())
                for (a, la), (b, lb) in zip(kids, kids[1:]):
                    if isinstance(la, _CONV) and not la.transposed and is_norm(lb):
                        pre = f"{path}." if path else ""
                        pairs.append((pre + a, pre + b))
    paired = {n for _, n in pairs}
    return pairs, [n for n in norms if n not in paired]


def _set(model: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, name, new)


def _to_cbn(conv: nn.Module, norm: nn.Module, window: int, path: str, copy_affine: bool) -> nn.Module:
    from .layers.cross_iteration import CrossIterationBatchNorm

    if getattr(norm, "channel_dim", 1) != 1 or getattr(norm, "num_features", conv.out_channels) != conv.out_channels:
        raise ValueError(f"normlab.convert: {path} does not normalize the {conv.out_channels} output channels "
                         f"(axis 1) of the convolution before it")
    eps = getattr(norm, "eps", None)
    new = CrossIterationBatchNorm(conv, window=window, eps=eps if eps else 1e-5)
    with torch.no_grad():
        names = ("weight", "bias") * copy_affine + ("running_mean", "running_var")
        for name in names:
            src, dst = getattr(norm, name, None), getattr(new, name, None)
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor) and src.shape == dst.shape:
                dst.copy_(src)
    new.train(norm.training)
    return new


def _unwrap(cbn: nn.Module) -> nn.Module:
    """A cross-iteration batch norm as ``Sequential(conv, BatchNorm)`` with its state (so that
    converting it to another spec keeps its convolution)."""
    from .layers.batch import BatchNorm

    bn = BatchNorm(cbn.num_features, eps=cbn.eps, momentum=cbn.momentum, affine=cbn.affine)
    bn = bn.to(device=cbn.running_mean.device, dtype=cbn.running_mean.dtype)
    bn.load_state_dict({k: v for k, v in cbn.state_dict().items() if not k.startswith("conv.")})
    bn.train(cbn.training)
    return nn.Sequential(cbn.conv, bn)


def convert_paired(model: nn.Module, spec: str, copy_affine: bool, is_norm: Any) -> tuple[nn.Module, bool]:
    """Handle ``+ws`` and ``cbn`` specs for :func:`normlab.convert`: (model, True) when done.

    For any other spec (model, False), after each cross-iteration batch norm has been turned
    back into its convolution followed by a batch norm (which the spec then replaces)."""
    from .convert import convert
    from .layers.cross_iteration import CrossIterationBatchNorm
    from .weight_std import weight_standardize

    if isinstance(model, CrossIterationBatchNorm):
        model = _unwrap(model)
    for path, m in list(model.named_modules()):
        if path and isinstance(m, CrossIterationBatchNorm):
            _set(model, path, _unwrap(m))
    base, ws = split_ws(spec)
    if not ws and not _is_cbn(base):
        return model, False
    if is_norm(model):
        raise ValueError(f"normlab.convert: spec {spec!r} needs the convolution before the norm; "
                         f"convert the model that holds both")
    pairs, unpaired = conv_norm_pairs(model, is_norm)
    if _is_cbn(base):
        _, kw = parse_spec(base)
        if unpaired:
            raise ValueError(f"normlab.convert: cbn needs a convolution right before each norm; none for "
                             f"{', '.join(unpaired)} (model left unchanged)")
        new = {conv: _to_cbn(model.get_submodule(conv), model.get_submodule(norm), kw.get("window", 4), norm,
                             copy_affine) for conv, norm in pairs}
        for conv, norm in pairs:
            _set(model, conv, new[conv])
            _set(model, norm, nn.Identity())
        return model, True
    parse_spec(base)
    convs = [model.get_submodule(c) for c, _ in pairs]
    convert(model, base, copy_affine)
    for conv in convs:
        if not nn.utils.parametrize.is_parametrized(conv, "weight"):
            weight_standardize(conv)
    return model, True
