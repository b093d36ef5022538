"""normlab: every neural-network normalization, one API.

Layers (``normlab.BatchNorm``, ...), pure functions (``normlab.functional``), a registry
(``normlab.make_norm("gn:16", 64)``), model conversion (``normlab.convert``), batch-norm
folding and statistics recalibration.
"""

from . import functional
from .convert import convert, convert_sync, fold_batchnorm, recalibrate
from .layers import (
    BatchInstanceNorm,
    BatchNorm,
    BatchRenorm,
    MeanOnlyBatchNorm,
    SwitchableNorm,
    ChannelLayerNorm,
    ChannelRMSNorm,
    GroupNorm,
    InstanceNorm,
    LayerNorm,
    Norm,
    RMSNorm,
    RunningStatsNorm,
)
from .layers import (
    GeneralizedHammingConv2d,
    GeneralizedHammingLinear,
    InputStandardizer,
    SPDBatchNorm,
    WeightNorm,
    data_dependent_init,
    weight_norm,
)
from .layers import BatchNormLSTM, LayerNormLSTM, LayerNormLSTMCell, OnlineNorm
from .layers import DynamicErf, DynamicTanh, EvoNormB0, EvoNormS0, FilterResponseNorm, GlobalResponseNorm, PowerNorm
from .layers import CrossIterationBatchNorm, InPlaceABN
from .optim import param_groups
from .selfnorm import normalizer_free, self_normalizing
from .weight_std import adaptive_clip_grad_, remove_weight_standardization, weight_standardize
from .registry import available_norms, describe_norms, make_norm, register

__version__ = "0.1.0"

__all__ = [
    "DynamicErf",
    "DynamicTanh",
    "EvoNormB0",
    "EvoNormS0",
    "FilterResponseNorm",
    "GlobalResponseNorm",
    "PowerNorm",
    "InPlaceABN",
    "CrossIterationBatchNorm",
    "BatchNormLSTM",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "OnlineNorm",
    "GeneralizedHammingConv2d",
    "GeneralizedHammingLinear",
    "InputStandardizer",
    "SPDBatchNorm",
    "WeightNorm",
    "data_dependent_init",
    "param_groups",
    "self_normalizing",
    "normalizer_free",
    "adaptive_clip_grad_",
    "remove_weight_standardization",
    "weight_standardize",
    "weight_norm",
    "BatchInstanceNorm",
    "BatchNorm",
    "BatchRenorm",
    "MeanOnlyBatchNorm",
    "SwitchableNorm",
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
    "convert_sync",
    "describe_norms",
    "fold_batchnorm",
    "functional",
    "make_norm",
    "recalibrate",
    "register",
]
