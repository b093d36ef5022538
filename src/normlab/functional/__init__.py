"""One pure function per normalization, named after it; each docstring gives the paper's
equation. Layers in ``normlab.layers`` are thin modules over these functions."""

from .._kernels import status as kernel_status
from ..engine import fast_path
from .frozen import frozen_batch_norm
from .batch import batch_norm, batch_renorm, batch_renorm_limits, mean_only_batch_norm
from .mixed import batch_instance_norm, switchable_norm
from .feature import (
    channel_layer_norm,
    channel_rms_norm,
    group_norm,
    instance_norm,
    layer_norm,
    rms_norm,
)
from .hamming import generalized_hamming_conv2d, generalized_hamming_linear
from .spd import bimap, karcher_mean, log_eig, re_eig, spd_batch_norm, spd_geodesic
from .weight import weight_norm
from .online import activation_clamp, layer_scaling, online_norm
from .recurrent import batch_norm_lstm_cell, layer_norm_lstm_cell
from .response import filter_response_norm, global_response_norm
from .evonorm import evonorm_b0, evonorm_s0
from .powernorm import power_norm
from .elementwise import dynamic_erf, dynamic_tanh
from .norm_act import batch_norm_leaky_relu_inplace
from .cross_iteration import cross_iteration_batch_norm

__all__ = [
    "filter_response_norm",
    "global_response_norm",
    "evonorm_b0",
    "evonorm_s0",
    "power_norm",
    "dynamic_erf",
    "dynamic_tanh",
    "batch_norm_leaky_relu_inplace",
    "cross_iteration_batch_norm",
    "fast_path",
    "kernel_status",
    "activation_clamp",
    "layer_scaling",
    "online_norm",
    "batch_norm_lstm_cell",
    "layer_norm_lstm_cell",
    "generalized_hamming_conv2d",
    "generalized_hamming_linear",
    "karcher_mean",
    "spd_batch_norm",
    "bimap",
    "re_eig",
    "log_eig",
    "spd_geodesic",
    "weight_norm",
    "batch_instance_norm",
    "batch_norm",
    "frozen_batch_norm",
    "batch_renorm",
    "batch_renorm_limits",
    "mean_only_batch_norm",
    "switchable_norm",
    "channel_layer_norm",
    "channel_rms_norm",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "rms_norm",
]
