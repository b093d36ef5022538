"""``nn.Module`` normalization layers, grouped by family. Each is a thin shell over its
function in ``normlab.functional``: parameters, buffers and input checks, no math."""

from .base import Norm, RunningStatsNorm
from .batch import BatchNorm
from .feature import ChannelLayerNorm, ChannelRMSNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm

__all__ = [
    "BatchNorm",
    "ChannelLayerNorm",
    "ChannelRMSNorm",
    "GroupNorm",
    "InstanceNorm",
    "LayerNorm",
    "Norm",
    "RMSNorm",
    "RunningStatsNorm",
]
