"""`odekit reduce`: reduced-order network (RON) compression of a range of layers (thesis ch. 5)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from odekit.cli.names import RANK_RULE_HELP, help_line
from odekit.cli.options import (
    DISTILLATION_BETA,
    FINETUNE_LR,
    STREAM_BATCH_SIZE,
    ArchArgsOpt,
    ArchOpt,
    BatchSizeOpt,
    BetaOpt,
    CheckpointArg,
    CommonOptions,
    DataDirOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    ExportOpt,
    FinetuneLrOpt,
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

  odekit reduce checkpoints/lenet300_digits.safetensors --layers 1-3 --rank 40,40,10 --finetune 6

  odekit reduce checkpoints/vgg11_digits.safetensors --layers 3-8 --rank vbmf -o runs/ron38

  odekit reduce checkpoints/vgg11_digits.safetensors --layers conv5-conv8 --rank energy:0.99 --oversample 2

  odekit info runs/ron38/student.safetensors   (the student is an ordinary odekit checkpoint)

The layer outputs z_k of layers A..B (after BN, activation and max-pool) are approximated as
V_k c_k with V_k from a streaming frequent-directions SVD over the training samples; rectangular
maxvol picks P_k = ceil(oversample x R_k) rows and the student propagates only those (Algorithm 1,
eq. 5.14; residual sums eq. 5.16). Rank rules: {rules}; or an integer R.
Writes student.safetensors (student.pt2, a self-contained torch.export program, when the
teacher's architecture is not an odekit one), singular_values.png (thesis fig. 5.1), report.json,
report.md. Any model torch.fx or torch.export can trace works: custom forwards, residual blocks,
functional activations, .pt2 archives.
FLOPs are 2 x multiply-adds per sample; latency is the median of timed forward passes of one
batch of --latency-batch test inputs after warm-up, on --device.
"""

EPILOG = EPILOG.format(rules=help_line(RANK_RULE_HELP))

RON = "RON options"


def reduce_command(
    checkpoint: CheckpointArg,
    layers: Annotated[
        str,
        typer.Option(
            "--layers",
            help="Contiguous compute layers to reduce: 7-16, conv7-conv16 (see 'odekit info').",
            show_default=False,
            rich_help_panel=RON,
        ),
    ],
    rank: Annotated[
        str,
        typer.Option(
            "--rank",
            help="Embedding size R_k: vbmf | energy:F | factor:F | an integer, for every reduced layer output, "
            "or a comma list with one per output (e.g. 40,40,10).",
            rich_help_panel=RON,
        ),
    ] = "vbmf",
    oversample: Annotated[
        float,
        typer.Option(
            "--oversample",
            help="Rows sampled per layer: P_k = ceil(oversample x R_k), >= 1.",
            rich_help_panel=RON,
        ),
    ] = 1.5,
    samples: Annotated[
        int | None,
        typer.Option(
            "--fit-samples",
            help="Training samples streamed for the SVDs (seeded subset) [default: all].",
            show_default=False,
            rich_help_panel=RON,
        ),
    ] = None,
    sketch_size: Annotated[
        int | None,
        typer.Option(
            "--sketch-size",
            help="Rows of each frequent-directions sketch [default: max(128, 2R), at most D and N].",
            show_default=False,
            rich_help_panel=RON,
        ),
    ] = None,
    finetune: Annotated[
        int,
        typer.Option(
            "--finetune",
            min=0,
            help="Fine-tuning epochs of the student (Adam, cosine).",
            rich_help_panel=RON,
        ),
    ] = 0,
    lr: FinetuneLrOpt = FINETUNE_LR,
    beta: BetaOpt = DISTILLATION_BETA,
    latency_batch: Annotated[
        int,
        typer.Option(
            "--latency-batch",
            min=1,
            help="Batch size of the latency measurement.",
            rich_help_panel=RON,
        ),
    ] = 256,
    export: ExportOpt = None,
    data: DataOpt = None,
    data_dir: DataDirOpt = None,
    batch_size: BatchSizeOpt = STREAM_BATCH_SIZE,
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
    """Compress layers A..B into a reduced-order network (RON, thesis ch. 5)."""
    from odekit.api.compression import clipped_states, run_reduce
    from odekit.api.onnx_export import check_export_format
    from odekit.api.results import model_file
    from odekit.cli.common import load_checkpoint, load_data, require_python_module
    from odekit.cli.errors import cli_text
    from odekit.methods.ron import RonSettings
    from odekit.methods.training import TrainSettings
    from odekit.models.registry import ARCHITECTURES

    common = CommonOptions(
        device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads
    )
    model_opts = ModelOptions(checkpoint, arch, num_classes, trust_checkpoint, arch_args)
    params: dict[str, Any] = {
        "layers": layers, "rank": rank, "oversample": oversample, "samples": samples, "sketch_size": sketch_size,
        "finetune": finetune, "lr": lr, "beta": beta, "latency_batch": latency_batch, "batch_size": batch_size,
        "data": data,
    }  # fmt: skip
    params["export"] = export

    def body(ctx: CommandContext) -> CommandOutput:
        settings = RonSettings(
            layers=layers, rank=rank, oversample=oversample, samples=samples, sketch_size=sketch_size,
            batch_size=batch_size,
        )  # fmt: skip
        train_settings = TrainSettings(
            epochs=finetune, lr=lr, batch_size=min(batch_size, 128), beta=beta, seed=seed
        )
        export_format = check_export_format(export)
        paths = {name: ctx.path(name) for name in ("student.safetensors", "singular_values.png")}
        if export_format is not None:
            paths["student.onnx"] = ctx.path("student.onnx")
        loaded = load_checkpoint(ctx, model_opts)
        require_python_module(loaded, "reduce")
        # a teacher no registry entry rebuilds gives a self-contained .pt2 program, not safetensors
        student = model_file("student", loaded.meta.arch in ARCHITECTURES)
        paths[student] = ctx.path(student)
        dataset = load_data(ctx, loaded, data, data_dir, prep=Preprocessing.from_options(normalize, input_shape, layout, pixel_max))
        result = run_reduce(loaded, dataset, settings, train_settings, ctx.device, latency_batch=latency_batch, seed=seed,
                            params=ctx.params, inputs=ctx.inputs, progress=ctx.progress, dist=ctx.dist,
                            export=export_format)  # fmt: skip
        written = result.write_outputs(paths.__getitem__, ctx.force)
        assert result.run is not None
        clipped = clipped_states(result.run)
        if clipped:  # issue 12: a rank rule stopped by the sketch, not by the data
            ctx.log(f"[yellow]Warning:[/yellow] ranks of {', '.join(clipped)} sit at the sketch size limit: "
                    "the sketch, not the data, bounded them (raise --sketch-size to let the rank rule decide)")
        headline = [cli_text(line) for line in result.headline]
        return CommandOutput(results={**result.results, **written}, tables=result.tables, headline=headline)

    run_command("reduce", common, inputs={}, params=params, body=body, run_name=checkpoint.stem, distributed=True)

