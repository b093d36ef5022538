"""normlab: every neural-network normalization, one API.

Layers (``normlab.BatchNorm``, ...), pure functions (``normlab.functional``), a registry
(``normlab.make_norm("gn:16", 64)``), model conversion (``normlab.convert``), batch-norm
folding and statistics recalibration.
"""

from . import functional
from .convert import convert, fold_batchnorm, recalibrate
from .layers import (
    BatchNorm,
    ChannelLayerNorm,
    ChannelRMSNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    Norm,
    RMSNorm,
    RunningStatsNorm,
)
from .registry import available_norms, describe_norms, make_norm, register

__version__ = "0.1.0"

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
    "available_norms",
    "convert",
    "describe_norms",
    "fold_batchnorm",
    "functional",
    "make_norm",
    "recalibrate",
    "register",
]
