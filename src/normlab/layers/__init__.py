"""``nn.Module`` normalization layers, grouped by family. Each is a thin shell over its
function in ``normlab.functional``: parameters, buffers and input checks, no math."""

from .base import BatchStatNorm, Norm, RunningStatsNorm
from .batch import BatchNorm, BatchRenorm, MeanOnlyBatchNorm
from .frozen import FrozenBatchNorm
from .wrap import NormAct
from .mixed import BatchInstanceNorm, SwitchableNorm
from .feature import ChannelLayerNorm, ChannelRMSNorm, GroupNorm, InstanceNorm, LayerNorm, RMSNorm
from .hamming import GeneralizedHammingConv2d, GeneralizedHammingLinear
from .input import InputStandardizer
from .spd import BiMap, LogEig, ReEig, SPDBatchNorm
from .weight import WeightNorm, data_dependent_init, weight_norm
from .online import OnlineNorm
from .recurrent import BatchNormLSTM, LayerNormLSTM, LayerNormLSTMCell
from .modern import DynamicErf, DynamicTanh, EvoNormB0, EvoNormS0, FilterResponseNorm, GlobalResponseNorm, PowerNorm
from .norm_act import InPlaceABN, with_activation
from .cross_iteration import CrossIterationBatchNorm

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
    "with_activation",
    "OnlineNorm",
    "BatchNormLSTM",
    "LayerNormLSTM",
    "LayerNormLSTMCell",
    "GeneralizedHammingConv2d",
    "GeneralizedHammingLinear",
    "InputStandardizer",
    "SPDBatchNorm",
    "BiMap",
    "ReEig",
    "LogEig",
    "WeightNorm",
    "data_dependent_init",
    "weight_norm",
    "BatchInstanceNorm",
    "BatchNorm",
    "BatchRenorm",
    "FrozenBatchNorm",
    "NormAct",
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
]
