"""Short specs to layers: ``make_norm("gn:16", 64)``.

A spec is a registered name, optionally followed by ``:`` and one argument (``gn:16`` is
group norm with 16 groups). Keyword overrides go to the layer's constructor, so the layout
travels with the spec: ``make_norm("gn:8", C, channel_dim=-1)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import nn

__all__ = ["NormEntry", "register", "make_norm", "available_norms", "describe_norms", "parse_spec", "get_entry",
           "split_ws"]


@dataclass(frozen=True)
class NormEntry:
    """What the registry knows of one norm.

    ``axes`` says, in words a user can check against their shapes, what the statistics are
    taken over; ``applies_to`` names the network kinds it suits ("conv", "dense", "seq"),
    which the study runner uses to pick norms for a task.
    """

    name: str
    factory: Callable[..., nn.Module]
    description: str
    axes: str
    paper: str
    arg: str | None = None  # the constructor keyword that ``name:ARG`` sets
    arg_type: Callable[[str], Any] = int
    applies_to: frozenset[str] = field(default_factory=lambda: frozenset({"conv", "dense", "seq"}))
    batch_stats: bool = False  # uses statistics over the batch (so it can be synchronized)


_REGISTRY: dict[str, NormEntry] = {}


def register(
    name: str,
    *,
    description: str,
    axes: str,
    paper: str,
    arg: str | None = None,
    arg_type: Callable[[str], Any] = int,
    applies_to: tuple[str, ...] = ("conv", "dense", "seq"),
    batch_stats: bool = False,
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Register ``factory(num_features, **kwargs) -> nn.Module`` under ``name``."""

    def deco(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"norm {name!r} is already registered")
        _REGISTRY[name] = NormEntry(
            name, factory, description, axes, paper, arg, arg_type, frozenset(applies_to), batch_stats
        )
        return factory

    return deco


def _ensure_builtin() -> None:
    # the built-in norms register themselves when their module is imported
    from . import _builtin_norms  # noqa: F401


def split_ws(spec: str) -> tuple[str, bool]:
    """``"gn:8+ws"`` -> ("gn:8", True): the suffix ``+ws`` asks ``convert`` to
    weight-standardize the convolution before each norm; without it (spec, False)."""
    s = spec.strip()
    if s.lower().endswith("+ws"):
        return s[: -len("+ws")], True
    return s, False


def parse_spec(spec: str) -> tuple[NormEntry, dict[str, Any]]:
    """``"gn:16"`` -> (the ``gn`` entry, ``{"num_groups": 16}``); clear errors otherwise."""
    _ensure_builtin()
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a norm spec must be a non-empty string, got {spec!r}")
    name, colon, arg = split_ws(spec)[0].partition(":")
    name = name.lower()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"unknown norm {name!r} in spec {spec!r}; known norms: {known}")
    entry = _REGISTRY[name]
    if colon and not arg.strip():
        raise ValueError(f"spec {spec!r} has a ':' but no argument after it")
    if not arg:
        return entry, {}
    if entry.arg is None:
        raise ValueError(f"norm {name!r} takes no ':' argument, got spec {spec!r}")
    try:
        return entry, {entry.arg: entry.arg_type(arg)}
    except ValueError:
        raise ValueError(f"spec {spec!r}: {entry.arg} must be {entry.arg_type.__name__}, got {arg!r}") from None


def get_entry(spec: str) -> NormEntry:
    return parse_spec(spec)[0]


def make_norm(spec: str, num_features: int, **overrides: Any) -> nn.Module:
    """Build the layer a spec names for ``num_features`` channels.

    >>> make_norm("gn:16", 64)
    GroupNorm(num_groups=16, 64, eps=1e-05, affine=True)
    >>> make_norm("lnc", 768, channel_dim=-1)     # torch.nn.LayerNorm(768) semantics
    ChannelLayerNorm(768, eps=1e-05, affine=True, channel_dim=-1)

    ``act`` ("relu", "leaky_relu", "silu", "gelu"; ``negative_slope``) appends an activation
    to the norm as one layer; ``inplace_abn=True`` (``bn`` with leaky_relu) keeps only the
    output for backward. See :func:`normlab.layers.norm_act.with_activation`.
    """
    entry, kwargs = parse_spec(spec)
    if split_ws(spec)[1]:  # silently dropping it would mislabel a model
        raise ValueError(f"spec {spec!r}: '+ws' standardizes the convolution before the norm, which make_norm "
                         f"does not see; build the model, then call normlab.convert(model, {spec!r})")
    act = {k: overrides.pop(k) for k in ("act", "negative_slope", "inplace_abn") if k in overrides}
    kwargs.update(overrides)
    module = entry.factory(num_features, **kwargs)
    if act:  # a fused activation: ``make_norm("bn", C, act="relu")``
        from .layers.norm_act import with_activation

        module = with_activation(module, act.pop("act", None), **act)
    return module


def available_norms() -> dict[str, str]:
    """Registered name -> one-line description."""
    _ensure_builtin()
    return {name: e.description for name, e in sorted(_REGISTRY.items())}


def describe_norms() -> list[NormEntry]:
    """Every registry entry, sorted by name (descriptions, axes and papers for ``normlab list``)."""
    _ensure_builtin()
    return [e for _, e in sorted(_REGISTRY.items())]
