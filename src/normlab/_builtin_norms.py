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
          paper="(no paper: the baseline)")
def _none(num_features: int, **kw: Any) -> nn.Module:
    return nn.Identity()


@register("mobn", description="mean-only batch norm: subtract the batch mean per channel, learned bias, no division",
          axes="every axis but the channel (N and all positions), per channel; mean only",
          paper="Salimans & Kingma, NIPS 2016 (arXiv:1602.07868)", applies_to=("conv", "dense", "seq"),
          batch_stats=True)
def _mobn(num_features: int, **kw: Any) -> nn.Module:
    return L.MeanOnlyBatchNorm(num_features, **kw)


@register("brn", description="batch renorm: batch norm corrected toward running mean/std by clipped r, d",
          axes="every axis but the channel (N and all positions), per channel",
          paper="Ioffe, NIPS 2017 (arXiv:1702.03275)", applies_to=("conv", "dense", "seq"), batch_stats=True)
def _brn(num_features: int, **kw: Any) -> nn.Module:
    return L.BatchRenorm(num_features, **kw)


# needs positions: its instance branch normalizes each (sample, channel) over them
@register("bin", description="batch-instance norm: learned per-channel mix (rho) of the BN and IN outputs",
          axes="BN: per channel over N and positions; IN: per sample and channel over positions",
          paper="Nam & Kim, NeurIPS 2018 (arXiv:1805.07925)", applies_to=("conv",), batch_stats=True)
def _bin(num_features: int, **kw: Any) -> nn.Module:
    return L.BatchInstanceNorm(num_features, **kw)


# (N, C) input has no positions, so no instance term: the dense case mixes layer and batch only
@register("sn", description="switchable norm: softmax-weighted mix of instance, layer and batch moments",
          axes="IN over positions, LN over C and positions, BN over N and positions (LN+BN for (N, C))",
          paper="Luo, Ren & Peng, ICLR 2019 (arXiv:1806.10779)", applies_to=("conv", "dense", "seq"),
          batch_stats=True)
def _sn(num_features: int, **kw: Any) -> nn.Module:
    return L.SwitchableNorm(num_features, **kw)


# streams over the samples in order (batch size 1 works), so nothing to synchronize across processes
@register("on", description="online norm: per channel, mean/var streamed over past samples; control-process backward",
          axes="per channel, over each sample's positions, averaged over the samples before it (EMA, alpha_fwd)",
          paper="Chiley et al., NeurIPS 2019 (arXiv:1905.05894)", applies_to=("conv", "dense"), batch_stats=False)
def _on(num_features: int, **kw: Any) -> nn.Module:
    return L.OnlineNorm(num_features, **kw)


# fixed statistics: nothing over the batch (batch_stats=False), so nothing to synchronize; a
# conversion target for trained models (normlab.freeze), not a norm to train from scratch, so
# no network kind picks it (the study would train an identity map)
@register("frozenbn", description="frozen batch norm: fixed running statistics and affine, eval behaviour in training too",
          axes="none at run time: per channel, the running statistics it was given",
          paper="Ioffe & Szegedy, ICML 2015 (arXiv:1502.03167); frozen as in detection backbones",
          applies_to=())
def _frozenbn(num_features: int, **kw: Any) -> nn.Module:
    return L.FrozenBatchNorm(num_features, **kw)


from . import _modern_norms  # noqa: E402,F401  (the norms since 2020 register themselves)
