"""`odekit export`: a checkpoint as an ONNX model, checked in onnxruntime against PyTorch."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from odekit.api.defaults import EXPORT_FORMATS
from odekit.cli.options import (
    ArchArgsOpt,
    ArchOpt,
    CheckpointArg,
    CommonOptions,
    DataDirOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    LayoutOpt,
    ModelOptions,
    NormalizeOpt,
    NumClassesOpt,
    OutOpt,
    PixelMaxOpt,
    SeedOpt,
    ThreadsOpt,
    TrustOpt,
)
from odekit.cli.runner import CommandContext, CommandOutput, run_command
from odekit.io.preprocessing import Preprocessing

EPILOG = """Examples:

  odekit export checkpoints/lenet5_digits.safetensors --to onnx -o runs/lenet5-onnx

  odekit export runs/ron38/student.safetensors --to onnx --latency-batch 64 --json

  odekit reduce checkpoints/vgg11_digits.safetensors --layers 3-8 --export onnx   (export while compressing)

Writes model.onnx (batch dimension dynamic: any batch size runs), report.json and report.md.
The ONNX model runs in onnxruntime on test inputs of the checkpoint's data set and must match
PyTorch within 1e-4 of the logits' largest magnitude (the report records the difference); both
runtimes are then timed on one batch of --latency-batch inputs, interleaved, on the CPU.
A model whose op has no ONNX translation gets one line naming the op. Needs odekit[onnx].
"""


def export_command(
    checkpoint: CheckpointArg,
    to: Annotated[str, typer.Option("--to", help=f"Format: {' | '.join(EXPORT_FORMATS)}.")] = "onnx",
    latency_batch: Annotated[int, typer.Option("--latency-batch", min=1, help="Batch size of the latency measurement.")] = 256,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    arch: ArchOpt = None,
    num_classes: NumClassesOpt = None,
    trust_checkpoint: TrustOpt = False,
    arch_args: ArchArgsOpt = None,
    normalize: NormalizeOpt = None,
    input_shape: InputShapeOpt = None,
    layout: LayoutOpt = "auto",
    pixel_max: PixelMaxOpt = None,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
    threads: ThreadsOpt = None,
) -> None:
    """Export a model to ONNX (dynamic batch), checked in onnxruntime and timed against PyTorch."""
    common = CommonOptions(device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads)
    model_opts = ModelOptions(checkpoint, arch, num_classes, trust_checkpoint, arch_args)
    params: dict[str, Any] = {"to": to, "latency_batch": latency_batch, "data": data}

    def body(ctx: CommandContext) -> CommandOutput:
        from odekit.api.onnx_export import LATENCY_REPEATS, check_export_format, run_export
        from odekit.cli.common import load_checkpoint, load_data, require_python_module

        check_export_format(to)
        path = ctx.path("model.onnx")
        loaded = load_checkpoint(ctx, model_opts)
        require_python_module(loaded, "export")
        dataset = load_data(ctx, loaded, data, data_dir, prep=Preprocessing.from_options(normalize, input_shape, layout, pixel_max))
        shape = tuple(loaded.input_shape or dataset.input_shape)
        inputs = dataset.test.x[:latency_batch] if len(dataset.test) else dataset.train.x[:latency_batch]
        result = run_export(loaded.model, shape, inputs, repeats=LATENCY_REPEATS, params=ctx.params, inputs_record=ctx.inputs)
        written = result.write_outputs(lambda _name: path, ctx.force)
        return CommandOutput(results={**result.results, **written}, tables=result.tables, headline=result.headline)

    run_command("export", common, inputs={}, params=params, body=body, run_name=checkpoint.stem)
