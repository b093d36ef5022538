"""Registrations of normlab's own norms (imported by the registry on first use)."""

from __future__ import annotations

from typing import Any

from torch import nn

from . import layers as L
from .registry import register

CONV_DENSE = ("conv", "dense")


@register("bn", description="batch norm: per channel over the batch and every position",
          axes="every axis but the channel (N and all positions), per channel",
          paper="Ioffe & Szegedy, ICML 2015 (arXiv:1502.03167)", applies_to=("conv", "dense", "seq"), batch_stats=True)
def _bn(num_features: int, **kw: Any) -> nn.Module:
    return L.BatchNorm(num_features, **kw)


@register("ln", description="layer norm, channel-first: per sample over C and every position",
          axes="every axis but the batch (C and all positions), per sample",
          paper="Ba, Kiros & Hinton 2016 (arXiv:1607.06450)")
def _ln(num_features: int, **kw: Any) -> nn.Module:
    return L.LayerNorm(num_features, **kw)


@register("lnc", description="layer norm over the channel axis alone (transformer/ConvNeXt style)",
          axes="the channel axis alone, at each sample and position",
          paper="Ba, Kiros & Hinton 2016 (arXiv:1607.06450); Vaswani et al. 2017")
def _lnc(num_features: int, **kw: Any) -> nn.Module:
    return L.ChannelLayerNorm(num_features, **kw)


@register("in", description="instance norm: per sample and channel over the positions",
          axes="every axis but batch and channel (the positions), per sample and channel",
          paper="Ulyanov, Vedaldi & Lempitsky 2016 (arXiv:1607.08022)", applies_to=("conv",))
def _in(num_features: int, **kw: Any) -> nn.Module:
    return L.InstanceNorm(num_features, **kw)


@register("gn", description="group norm: per sample over groups of channels (gn:G, G=32 default)",
          axes="per sample, over each group of C/G consecutive channels and all positions",
          paper="Wu & He, ECCV 2018 (arXiv:1803.08494)", arg="num_groups", applies_to=("conv",))
def _gn(num_features: int, num_groups: int = 32, **kw: Any) -> nn.Module:
    # the paper's default of 32 groups cannot apply to fewer channels; say so rather than guess
    return L.GroupNorm(num_features, num_groups=num_groups, **kw)


@register("rms", description="RMS norm: per sample over C and every position, no centring",
          axes="every axis but the batch (C and all positions), per sample; no mean subtracted",
          paper="Zhang & Sennrich, NeurIPS 2019 (arXiv:1910.07467)")
def _rms(num_features: int, **kw: Any) -> nn.Module:
    return L.RMSNorm(num_features, **kw)


@register("rmsc", description="RMS norm over the channel axis alone (transformer style)",
          axes="the channel axis alone, at each sample and position; no mean subtracted",
          paper="Zhang & Sennrich, NeurIPS 2019 (arXiv:1910.07467)")
def _rmsc(num_features: int, **kw: Any) -> nn.Module:
    return L.ChannelRMSNorm(num_features, **kw)


@register("none", description="no normalization (identity)", axes="nothing",
          paper="baseline")
def _none(num_features: int, **kw: Any) -> nn.Module:
    return nn.Identity()
