"""`odekit reduce`: reduced-order network (RON) compression of a range of layers (thesis ch. 5)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from odekit.cli.certify import CertifyFlag, certify_student
from odekit.cli.names import RANK_RULE_HELP, help_line
from odekit.cli.options import (
    DISTILLATION_BETA,
    FINETUNE_LR,
    STREAM_BATCH_SIZE,
    VAL_FRACTION,
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
    PatienceOpt,
    PixelMaxOpt,
    RecalibrateBnOpt,
    SeedOpt,
    ThreadsOpt,
    TrustOpt,
    ValFractionOpt,
)
from odekit.cli.runner import CommandContext, CommandOutput, run_command
from odekit.io.preprocessing import Preprocessing

EPILOG = """Examples:

  odekit reduce checkpoints/resnet20_digits.safetensors --target-flops 2x

  odekit reduce model.pt2 --mode channel --target-flops 0.25 --max-drop 1 --finetune 1

  odekit reduce checkpoints/lenet300_digits.safetensors --mode region --layers 1-3 --rank 40,40,10 --finetune 6

  odekit reduce checkpoints/vgg11_digits.safetensors --layers 3-8 --rank vbmf -o runs/ron38

  odekit reduce checkpoints/vgg11_digits.safetensors --layers conv5-conv8 --rank energy:0.99 --oversample 2

  odekit info runs/ron38/student.safetensors   (the student is an ordinary odekit checkpoint)

Channel mode (docs/reduce.md): the same graph with fewer channels. Channels tied by residual
sums or SE gates share one selection; per group, P channels are picked by maxvol on the POD basis
of the channel vectors and a least-squares reconstruction is folded into the consumers; widths
from --target-flops (global greedy on a held-out validation split) or --rank. Writes student.pt2
(a torch.export program), and student.safetensors too when the teacher's architecture is registered.
No mode writes a student with more FLOPs or parameters than the teacher.

Region mode: the layer outputs z_k of layers A..B (after BN, activation and max-pool) are approximated as
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
        str | None,
        typer.Option(
            "--layers",
            help="Compute layers to reduce: 7-16, conv7-conv16 (see 'odekit info') [default: every reducible "
            "channel group; required by --mode region].",
            show_default=False,
            rich_help_panel=RON,
        ),
    ] = None,
    mode: Annotated[
        str,
        typer.Option(
            "--mode",
            help="channel: the same network with fewer channels; region: a dense reduced-order network over "
            "--layers (thesis ch. 5); auto: channel, or over --layers the one with fewer FLOPs.",
            rich_help_panel=RON,
        ),
    ] = "auto",
    target_flops: Annotated[
        str | None,
        typer.Option(
            "--target-flops",
            help="Channel widths allocated over all groups to keep this fraction of the teacher's FLOPs "
            "(0.5) or to cut them by a factor (2x).",
            show_default=False,
            rich_help_panel=RON,
        ),
    ] = None,
    max_drop: Annotated[
        float | None,
        typer.Option(
            "--max-drop",
            help="Accuracy points the student may lose on a validation split held out from the training data.",
            show_default=False,
            rich_help_panel=RON,
        ),
    ] = None,
    reconstruct: Annotated[
        str,
        typer.Option(
            "--reconstruct",
            help="Channel mode: lsq (least squares to the teacher's channels) or interp (POD interpolation).",
            rich_help_panel=RON,
        ),
    ] = "lsq",
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
            help="Training samples streamed for the SVDs (seeded subset) [default: all; channel mode 512].",
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
            help="Fine-tuning epochs of the student (Adam, cosine); the best epoch on the validation split "
            "is kept, the untuned student included.",
            rich_help_panel=RON,
        ),
    ] = 0,
    lr: FinetuneLrOpt = FINETUNE_LR,
    beta: BetaOpt = DISTILLATION_BETA,
    val_fraction: ValFractionOpt = VAL_FRACTION,
    patience: PatienceOpt = None,
    recalibrate_bn: RecalibrateBnOpt = True,
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
    certify: CertifyFlag = False,
) -> None:
    """Compress a network: fewer channels (channel mode) or a reduced-order network over layers A..B (RON, thesis ch. 5)."""
    from odekit.api.compression import clipped_states, run_reduce
    from odekit.api.finetune_report import FINETUNE_PLOT
    from odekit.api.onnx_export import check_export_format
    from odekit.cli.common import load_checkpoint, load_data, require_python_module
    from odekit.cli.errors import cli_text
    from odekit.methods.ron import RonSettings
    from odekit.methods.ron.settings import parse_target_flops
    from odekit.methods.training import TrainSettings

    common = CommonOptions(
        device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads
    )
    model_opts = ModelOptions(checkpoint, arch, num_classes, trust_checkpoint, arch_args)
    params: dict[str, Any] = {
        "layers": layers, "mode": mode, "target_flops": target_flops, "max_drop": max_drop,
        "reconstruct": reconstruct, "rank": rank, "oversample": oversample, "samples": samples, "sketch_size": sketch_size,
        "finetune": finetune, "lr": lr, "beta": beta, "val_fraction": val_fraction, "patience": patience,
        "recalibrate_bn": recalibrate_bn, "latency_batch": latency_batch, "batch_size": batch_size,
        "data": data,
    }  # fmt: skip
    params["export"] = export

    params["certify"] = certify

    def body(ctx: CommandContext) -> CommandOutput:
        settings = RonSettings(
            layers=layers, rank=rank, oversample=oversample, samples=samples, sketch_size=sketch_size,
            batch_size=batch_size, mode=mode, target_flops=parse_target_flops(target_flops), max_drop=max_drop,
            reconstruct=reconstruct,
        )  # fmt: skip
        train_settings = TrainSettings(
            epochs=finetune, lr=lr, batch_size=min(batch_size, 128), beta=beta, seed=seed,
            val_fraction=val_fraction, patience=patience, recalibrate_bn=recalibrate_bn,
        )
        export_format = check_export_format(export)
        # claimed before any work, so a taken --out fails at once (claims are idempotent)
        # (student.pt2: a teacher no registry entry rebuilds, and every channel student)
        for name in ("student.safetensors", "student.pt2", "singular_values.png", FINETUNE_PLOT,
                     *["student.onnx"] * (export_format is not None)):  # fmt: skip
            ctx.path(name)
        loaded = load_checkpoint(ctx, model_opts)
        require_python_module(loaded, "reduce")
        dataset = load_data(ctx, loaded, data, data_dir, prep=Preprocessing.from_options(normalize, input_shape, layout, pixel_max))
        result = run_reduce(loaded, dataset, settings, train_settings, ctx.device, latency_batch=latency_batch, seed=seed,
                            params=ctx.params, inputs=ctx.inputs, progress=ctx.progress, dist=ctx.dist,
                            export=export_format)  # fmt: skip
        written = result.write_outputs(ctx.path, ctx.force)
        assert result.run is not None
        clipped = clipped_states(result.run)
        if clipped:  # issue 12: a rank rule stopped by the sketch, not by the data
            ctx.log(f"[yellow]Warning:[/yellow] ranks of {', '.join(clipped)} sit at the sketch size limit: "
                    "the sketch, not the data, bounded them (raise --sketch-size to let the rank rule decide)")
        headline = [cli_text(line) for line in result.headline]
        extra: dict[str, Any] = {}
        if certify and result.student is not None:
            extra["certify"] = certify_student(result.student, loaded.model, dataset, ctx)
        return CommandOutput(results={**result.results, **written, **extra}, tables=result.tables, headline=headline)

    run_command("reduce", common, inputs={}, params=params, body=body, run_name=checkpoint.stem, distributed=True)

