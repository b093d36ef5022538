"""Registrations of the norms since 2020 (imported by ``_builtin_norms``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .layers import modern as M
from .registry import register


@register("frn", description="filter response norm + TLU: per sample and channel, x / RMS over positions, max(., tau)",
          axes="every axis but batch and channel (the positions), per sample and channel; no mean subtracted",
          paper="Singh & Krishnan, CVPR 2020 (arXiv:1911.09737)", applies_to=("conv",))
def _frn(num_features: int, **kw: Any) -> nn.Module:
    return M.FilterResponseNorm(num_features, **kw)


@register("evob0", description="EvoNorm-B0: x / max(batch std, v*x + instance std), running variance in eval",
          axes="batch variance per channel (N and positions); instance variance per sample and channel",
          paper="Liu, Brock, Simonyan & Le, NeurIPS 2020 (arXiv:2004.02967)", applies_to=("conv",))
def _evob0(num_features: int, **kw: Any) -> nn.Module:
    return M.EvoNormB0(num_features, **kw)


@register("evos0", description="EvoNorm-S0: x * sigmoid(v*x) / group std (evos0:G, G=32 default)",
          axes="per sample, over each group of C/G consecutive channels and all positions",
          paper="Liu, Brock, Simonyan & Le, NeurIPS 2020 (arXiv:2004.02967)", arg="num_groups", applies_to=("conv",))
def _evos0(num_features: int, num_groups: int = 32, **kw: Any) -> nn.Module:
    return M.EvoNormS0(num_features, num_groups=num_groups, **kw)


@register("grn", description="global response norm (ConvNeXt V2): x + gamma * x * N + beta, N = L2 over positions "
                             "/ its channel mean",
          axes="L2 norm over the positions per sample and channel, divided by its mean over the channels",
          paper="Woo et al., CVPR 2023 (arXiv:2301.00808)", applies_to=("conv",))
def _grn(num_features: int, **kw: Any) -> nn.Module:
    return M.GlobalResponseNorm(num_features, **kw)


@register("pn", description="PowerNorm: no centring, divide by a running quadratic mean; approximate backprop",
          axes="every axis but the channel (N and all positions), per channel, as a running average",
          paper="Shen, Yao, Gholami, Mahoney & Keutzer, ICML 2020 (arXiv:2003.07845)", applies_to=("conv", "dense"))
def _pn(num_features: int, **kw: Any) -> nn.Module:
    return M.PowerNorm(num_features, **kw)


@register("dyt", description="Dynamic Tanh: gamma * tanh(alpha * x) + beta, no statistics (LN replacement)",
          axes="nothing (element-wise; one learned scalar alpha)",
          paper="Zhu, Chen, He, LeCun & Liu, CVPR 2025 (arXiv:2503.10622)", applies_to=("seq",))
def _dyt(num_features: int, **kw: Any) -> nn.Module:
    return M.DynamicTanh(num_features, **kw)


@register("derf", description="Dynamic erf: gamma * erf(alpha * x + s) + beta, no statistics (LN replacement)",
          axes="nothing (element-wise; learned scalars alpha and s)",
          paper="Chen, Lu, Zhu, Sun & Liu 2025 (arXiv:2512.10938)", applies_to=("seq",))
def _derf(num_features: int, **kw: Any) -> nn.Module:
    return M.DynamicErf(num_features, **kw)


# built by convert, which pairs each norm with the conv before it, not from a channel count alone;
# batch_stats stays False: it has no process group (the engine's merge could add one)
@register("cbn", description="cross-iteration batch norm: BN statistics pooled over the last k iterations (cbn:k)",
          axes="every axis but the channel, per channel, over this and the k-1 previous batches (Taylor-compensated)",
          paper="Yao, Cao, Zheng, Huang & Lin, CVPR 2021 (arXiv:2002.05712)", arg="window", applies_to=())
def _cbn(num_features: int, **kw: Any) -> nn.Module:
    raise ValueError("cbn wraps the convolution before the norm: use normlab.CrossIterationBatchNorm(conv, window=k) "
                     "or normlab.convert(model, 'cbn:k'); make_norm cannot build it from a channel count")
