"""Forward hooks that stream layer outputs batch by batch, and per-sample gradient helpers."""

from odekit.streaming.grads import (
    LOSSES,
    per_sample_activation_grads,
    per_sample_input_grads,
    per_sample_loss,
)
from odekit.streaming.hooks import LayerStream, batch_inputs, model_device, stream_layer_outputs

__all__ = [
    "LOSSES",
    "LayerStream",
    "batch_inputs",
    "model_device",
    "per_sample_activation_grads",
    "per_sample_input_grads",
    "per_sample_loss",
    "stream_layer_outputs",
]
