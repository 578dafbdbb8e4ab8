"""`odekit reduce`: reduced-order network (RON) compression of a range of layers (thesis ch. 5)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from odekit.cli.certify import CertifyFlag, certify_student
from odekit.cli.finetune_report import FINETUNE_PLOT, history_figure, history_table
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
from odekit.cli.reduce_channel import channel_output, speed_text, summary_table
from odekit.cli.runner import CommandContext, CommandOutput, ResultTable, run_command
from odekit.io.preprocessing import Preprocessing

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch (issue 12)
    import torch

    from odekit.io.checkpoints import ModelMeta
    from odekit.methods.ron import RonLayerReport, RonResult, RonRun

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
from --target-flops (global greedy on a held-out validation split) or --rank. Writes student.pt2.
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
    import torch

    from odekit.cli.common import load_checkpoint, load_data, require_python_module
    from odekit.methods.ron import RON_ARCH, RonResult, RonSettings, reduce_teacher
    from odekit.methods.ron.settings import parse_target_flops
    from odekit.methods.training import TrainSettings
    from odekit.models.registry import ARCHITECTURES
    from odekit.writers.plots import save_figure

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
        student_path = ctx.path("student.safetensors")
        plot_path = ctx.path("singular_values.png")
        history_path = ctx.path(FINETUNE_PLOT)

        loaded = load_checkpoint(ctx, model_opts)
        require_python_module(loaded, "reduce")
        # A student of an architecture no registry entry rebuilds is written as a self-contained
        # torch.export program instead of weights + metadata.
        registered = loaded.meta.arch in ARCHITECTURES
        if not registered:
            student_path = ctx.path("student.pt2")
        dataset = load_data(ctx, loaded, data, data_dir, prep=Preprocessing.from_options(normalize, input_shape, layout, pixel_max))
        shape = tuple(loaded.input_shape or dataset.input_shape)
        example = dataset.test.x[:latency_batch]
        if example.shape[0] == 0:
            example = dataset.train.x[:latency_batch]
        run = reduce_teacher(
            loaded.model, loaded.meta.arch, loaded.meta.args, shape, dataset, settings, train_settings, ctx.device,
            example, distill=beta > 0, seed=seed, progress=ctx.progress, dist=ctx.dist,
        )  # fmt: skip
        if run.mode == "channel":
            return channel_output(ctx, run, loaded, shape, example, params)
        result, compared, student = run.build, run.comparison, run.student
        assert isinstance(result, RonResult)
        span = f"{result.first_layer}-{result.last_layer}"
        step = {"command": "reduce", "layers": span, "rank": rank, "ranks": result.ranks, "oversample": oversample,
                "finetune_epochs": finetune, "kept_epoch": run.history.best_epoch,
                "test_accuracy": compared.student.accuracy}  # fmt: skip
        meta = loaded.meta.derived(RON_ARCH, result.args, step, source=loaded.sha256)
        meta.extra = {"test_accuracy": compared.student.accuracy, "teacher_accuracy": compared.teacher.accuracy}
        reloaded = _write_student(student_path, student, meta, shape, registered, ctx)
        with torch.no_grad():
            probe = example[:16].to(ctx.device)
            reload_diff = float((reloaded(probe) - student(probe)).abs().max())
        save_figure(_singular_value_figure(result.layers, result.first_layer, result.last_layer), plot_path, force=ctx.force)
        save_figure(history_figure(run.history, f"reduce layers {span}: fine-tuning"), history_path, force=ctx.force)

        results: dict[str, Any] = {
            **compared.to_dict("reduce"),
            "ranks": result.ranks,
            "rows": [layer.rows for layer in result.layers],
            "layers": [_layer_json(layer) for layer in result.layers],
            "modified_layers": span,
            "samples": result.n_samples,
            "distributed": _distributed_json(ctx, result),
            "finetune_history": run.history.epochs,
            "finetune": run.history.to_dict() | {"plot": str(history_path)},
            "reload_max_abs_diff": reload_diff,
            "student_checkpoint": str(student_path),
            "singular_value_plot": str(plot_path),
            "units": {
                "accuracy": "fraction in [0, 1]",
                "flops": "2 x multiply-adds per sample",
                "latency_ms": f"median ms per batch of {int(example.shape[0])} on {ctx.device}, teacher and student interleaved",
                "mean_kl": "nats, KL(teacher || student) averaged over the test split",
            },
        }
        headline = [
            f"RON layers {span}, ranks {result.ranks}: accuracy {100 * compared.student.accuracy:.2f}% (teacher "
            f"{100 * compared.teacher.accuracy:.2f}%, before fine-tuning {100 * (compared.student_before or 0.0):.2f}%), "
            f"agreement {100 * compared.agreement:.2f}%, {compared.flop_reduction:.2f}x fewer FLOPs, "
            f"{speed_text(run.latency.speedup)}"
        ]
        if certify:
            results["certify"] = certify_student(student, loaded.model, dataset, ctx)
        if finetune > 0:
            headline.append(run.history.summary())
        clipped = [layer.state for layer in result.layers if _at_sketch_limit(layer)]
        if clipped:  # issue 12: a rank rule stopped by the sketch, not by the data
            ctx.log(f"[yellow]Warning:[/yellow] ranks of {', '.join(clipped)} sit at the sketch size limit: "
                    "the sketch, not the data, bounded them (raise --sketch-size to let the rank rule decide)")
            headline.append(f"ranks clipped by --sketch-size: {', '.join(clipped)}")
        return CommandOutput(results=results, tables=_tables(run, result), headline=headline)

    run_command("reduce", common, inputs={}, params=params, body=body, run_name=checkpoint.stem, distributed=True)


def _write_student(
    path: Path, student: torch.nn.Module, meta: ModelMeta, shape: tuple[int, ...], registered: bool, ctx: CommandContext
) -> torch.nn.Module:
    """Write the student (safetensors + metadata, or a .pt2 program) and read it back."""
    from odekit.io.checkpoints import load_model, save_model
    from odekit.io.exported import load_exported, save_exported

    if registered:
        save_model(path, student, meta, force=ctx.force)
        return load_model(path).model.to(ctx.device).eval()
    save_exported(path, student.cpu(), shape, meta.to_json(), force=ctx.force)
    student.to(ctx.device)
    return load_exported(path)[0].to(ctx.device)


def _tables(run: RonRun, result: RonResult) -> list[ResultTable]:
    """The reduced layers (eq. 5.18-5.20 diagnostics) and teacher vs student."""
    layers = ResultTable(
        "Reduced layers (D: layer output size, R: rank, P: sampled rows; eq. 5.20 factor)",
        ["state", "layers", "D_k", "R_k", "P_k", "pool", "s_R/s_1", "eq. 5.20 factor", "1/s_min(S V) (eq. 5.18)", "residual energy"],
        [
            [r.state, ",".join(r.layers) or "-", r.dim, r.rank, r.rows, "yes" if r.pooled else "-", r.decay,
             r.error_factor, r.amplification, r.residual_energy]
            for r in result.layers
        ],
    )  # fmt: skip
    return [layers, summary_table(run), history_table(run.history)]


def _distributed_json(ctx: CommandContext, result: RonResult) -> dict[str, Any]:
    """World size, backend, this (main) rank's streaming rate and each layer's sketch merge."""
    return {
        **ctx.dist.describe(),
        "stream_rank0": result.throughput.to_dict() if result.throughput else None,
        "sketch_merges": [m.to_dict() for m in result.merges],
    }


def _layer_json(layer: RonLayerReport) -> dict[str, Any]:
    d = layer.to_dict()
    d["singular_values_normalized"] = d.pop("singular_values")
    d["rank_at_sketch_limit"] = _at_sketch_limit(layer)
    return d


def _at_sketch_limit(layer: RonLayerReport) -> bool:
    """The rank uses every direction a full sketch smaller than the layer holds: --sketch-size, not the
    data, bounded it (a frequent-directions sketch of l rows keeps at most l - 1 nonzero directions)."""
    rows = len(layer.singular_values)
    nonzero = sum(v > 1e-12 for v in layer.singular_values)
    return rows < layer.dim and nonzero >= rows - 1 and layer.rank >= nonzero


def _singular_value_figure(layers: list[RonLayerReport], first: int, last: int) -> Any:
    from odekit.writers.plots import new_figure

    fig, axes = new_figure(1, 1, (6.5, 4.2))
    ax = axes[0][0]
    for layer in layers:
        s = [v for v in layer.singular_values if v > 1e-12]  # drop numerical zeros (dead units)
        if not s:
            continue
        label = f"{','.join(layer.layers) or layer.state} (D={layer.dim}, R={layer.rank})"
        ax.semilogy(range(1, len(s) + 1), s, label=label)
        if layer.rank <= len(s):
            ax.plot([layer.rank], [s[layer.rank - 1]], "o", color=ax.lines[-1].get_color())
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1 (layer outputs, sketch)")
    ax.set_title(f"Singular values of layer outputs, layers {first}-{last} (dots: chosen rank)")
    ax.grid(True, which="both", alpha=0.3)
    if layers:
        ax.legend(fontsize=8)
    return fig
