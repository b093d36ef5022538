"""normlab: every neural-network normalization, one API.

Layers (``normlab.BatchNorm``, ...), pure functions (``normlab.functional``), a registry
(``normlab.make_norm("gn:16", 64)``), model conversion (``normlab.convert``), batch-norm
folding and statistics recalibration, and ``normlab.compare``: which norm suits your own
model and data, at each batch size, at what cost.
"""

from . import functional
from .convert import convert, convert_sync, fold_batchnorm, freeze, inspect, recalibrate, unfreeze
from .layers import (
    BatchInstanceNorm,
    BatchNorm,
    BatchRenorm,
    FrozenBatchNorm,
    MeanOnlyBatchNorm,
    NormAct,
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


def __getattr__(name: str) -> object:
    # normlab.compare (the study on a user's model and data) loads the study's dependencies
    # only when used
    if name == "compare":
        from .study.compare import compare

        return compare
    raise AttributeError(f"module 'normlab' has no attribute {name!r}")

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
    "FrozenBatchNorm",
    "NormAct",
    "freeze",
    "inspect",
    "unfreeze",
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
    "compare",
    "convert",
    "convert_sync",
    "describe_norms",
    "fold_batchnorm",
    "functional",
    "make_norm",
    "recalibrate",
    "register",
]
