"""Defaults the API functions and the CLI options share (no torch import: `--help` reads them)."""

STREAM_BATCH_SIZE = 256  # streaming/evaluation batch of reduce, asnet, attack, smoothness-check
FINETUNE_LR = 1e-4  # thesis 6.5.1 (Adam, VGG); 5e-4 collapsed a full-width VGG-19 RON student
DISTILLATION_BETA = 0.1  # thesis eq. 6.29
VAL_FRACTION = 0.1  # training samples held out to choose the epoch kept (docs/finetuning.md)
LATENCY_BATCH = 256  # reduce: test inputs per timed forward pass
EXPORT_FORMATS = ("onnx",)  # --export / export=: deployment formats besides safetensors and .pt2
