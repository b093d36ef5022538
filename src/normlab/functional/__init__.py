"""One pure function per normalization, named after it; each docstring gives the paper's
equation. Layers in ``normlab.layers`` are thin modules over these functions."""

from .batch import batch_norm
from .feature import (
    channel_layer_norm,
    channel_rms_norm,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)

__all__ = [
    "batch_norm",
    "channel_layer_norm",
    "channel_rms_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
]
