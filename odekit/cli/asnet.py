"""`odekit asnet`: active-subspace analysis of a model's layers and ASNet compression."""

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
    SeedOpt,
    ThreadsOpt,
    TrustOpt,
    ValFractionOpt,
)
from odekit.cli.runner import CommandContext, CommandOutput, run_command
from odekit.io.preprocessing import Preprocessing

EPILOG = """Examples:

  odekit asnet checkpoints/vgg11_digits.safetensors --analyze

  odekit asnet checkpoints/vgg11_digits.safetensors --analyze --layers 3-8 --energy-tol 0.05

  odekit asnet checkpoints/vgg11_digits.safetensors --cut 4 --rank 10 --finetune 5 -o runs/asnet4

  odekit asnet checkpoints/lenet5_digits.safetensors --cut 2 --rank auto --finetune 5 --sparse --l1 2

  odekit asnet checkpoints/lenet300_digits.safetensors --cut 1 --rank energy:0.9

  odekit attack runs/asnet4/asnet.safetensors ...   (the ASNet is an ordinary odekit checkpoint)

--analyze: per layer, n_l, the number of active neurons (eq. 6.17 at --energy-tol), the gradient
singular-value spectrum (spectrum.png, thesis fig. 6.5a) and logistic regression on the layer's
features. --cut L: ASNet = layers 1..L (with the BN/activation/pooling after L) + active-subspace
layer + degree-p Hermite PCE fitted to the teacher's logits, then optional distillation
fine-tuning (loss = beta KL(teacher||student) + (1-beta) CE) and L1 proximal steps (--sparse,
ASNet-s). A model that is not a plain chain of modules (residual blocks, custom forward, .pt2)
is cut by splitting its traced graph after layer L; inside a residual block the skip tensor
is part of the cut (n_l counts both). Writes asnet.safetensors (asnet.pt2, a self-contained
torch.export program, when the teacher's architecture is not an odekit one), spectrum.png,
baselines.png, report.json, report.md.
--rank takes reduce's rank grammar, applied to the singular values of the cut layer's gradient
sketch (energy:F against the exact ||G||_F^2): {rules}; an integer r; or auto: the active neurons
at --energy-tol (eq. 6.17).
FLOPs are 2 x multiply-adds per sample; latency is the median of teacher and ASNet timed
alternately on one test image and on one batch of --batch-size test images, on --device.
"""

EPILOG = EPILOG.format(rules=help_line(RANK_RULE_HELP))

ASNET = "ASNet options"
ANALYSIS = "Analysis options"


def asnet_command(
    checkpoint: CheckpointArg,
    analyze: Annotated[
        bool, typer.Option("--analyze", help="Active-subspace analysis of layers (see --layers).", rich_help_panel=ANALYSIS)
    ] = False,
    layers: Annotated[
        str | None,
        typer.Option(
            "--layers",
            help="Layers to analyse: 3-8, conv3-conv8, 5, features.7 [default: every layer that can be cut]. Implies --analyze.",
            show_default=False,
            rich_help_panel=ANALYSIS,
        ),
    ] = None,
    cut: Annotated[
        str | None,
        typer.Option("--cut", help="Build an ASNet cut after this compute layer (index, alias or name).", rich_help_panel=ASNET),
    ] = None,
    rank: Annotated[
        str | None,
        typer.Option(
            "--rank",
            help="Active neurons r kept: vbmf | energy:F | factor:F | an integer (reduce's rules, on the gradient "
            "sketch's singular values) | auto (the --energy-tol rule, eq. 6.17) "
            "[default: 50 (thesis), capped so that training samples >= 2 x PCE basis size].",
            show_default=False,
            rich_help_panel=ASNET,
        ),
    ] = None,
    eps: Annotated[
        float, typer.Option(
            "--energy-tol",
            help="Active-neuron threshold: the smallest r with ||(s_1..s_r)|| >= (1 - F) ||s|| on the sketch's "
            "singular values (eq. 6.17; --rank auto uses it).",
            rich_help_panel=ANALYSIS,
        )
    ] = 0.05,
    degree: Annotated[int, typer.Option("--degree", help="PCE polynomial degree p.", rich_help_panel=ASNET)] = 2,
    sketch_size: Annotated[
        int | None,
        typer.Option(
            "--sketch-size",
            help="Rows of the frequent-directions sketch [default: max(100, 2 x rank)].",
            show_default=False,
            rich_help_panel=ANALYSIS,
        ),
    ] = None,
    samples: Annotated[
        int | None,
        typer.Option(
            "--fit-samples",
            help="Training samples for gradients and the PCE fit (seeded subset) [default: all].",
            show_default=False,
            rich_help_panel=ANALYSIS,
        ),
    ] = None,
    ridge: Annotated[
        float, typer.Option("--ridge", help="Ridge term added to the PCE Gram matrix (per sample).", rich_help_panel=ASNET)
    ] = 0.0,
    finetune: Annotated[
        int, typer.Option("--finetune", min=0, help="Fine-tuning epochs (Adam, cosine schedule); the best epoch on the "
                          "validation split is kept, the untuned ASNet included.", rich_help_panel=ASNET)
    ] = 0,
    val_fraction: ValFractionOpt = VAL_FRACTION,
    patience: PatienceOpt = None,
    beta: BetaOpt = DISTILLATION_BETA,
    lr: FinetuneLrOpt = FINETUNE_LR,
    head_lr: Annotated[float | None, typer.Option("--head-lr", help="Fine-tuning learning rate of the AS and PCE layers (thesis: 1e-5) [--lr].", show_default=False, rich_help_panel=ASNET)] = None,
    sparse: Annotated[
        bool, typer.Option("--sparse", help="ASNet-s: L1 proximal step after every update (eq. 6.29).", rich_help_panel=ASNET)
    ] = False,
    l1: Annotated[
        float,
        typer.Option("--l1", help="L1 weight lambda of --sparse (each step shrinks weights by lr x lambda).", rich_help_panel=ASNET),
    ] = 1.0,
    baselines: Annotated[
        bool,
        typer.Option(
            "--baselines/--no-baselines",
            help="Logistic-regression and PCA baselines (thesis fig. 6.5b).",
            rich_help_panel=ANALYSIS,
        ),
    ] = True,
    latency: Annotated[
        bool,
        typer.Option("--latency/--no-latency", help="Measure teacher and ASNet latency (median ms).", rich_help_panel=ASNET),
    ] = True,
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
    """Active-subspace analysis and ASNet compression (thesis ch. 6.2-6.3)."""
    from odekit.api.asnets import check_request, run_asnet
    from odekit.api.onnx_export import check_export_format
    from odekit.api.results import model_file
    from odekit.cli.common import load_checkpoint, load_data, require_python_module
    from odekit.cli.errors import cli_text
    from odekit.methods.asnet import (
        ASNetSettings,
        SubspaceSettings,
        default_sketch_size,
        is_registered_teacher,
        parse_rank,
    )

    common = CommonOptions(device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads)
    model_opts = ModelOptions(checkpoint, arch, num_classes, trust_checkpoint, arch_args)
    analyze = analyze or layers is not None
    params: dict[str, Any] = {
        "analyze": analyze, "layers": layers, "cut": cut, "rank": rank, "eps": eps, "degree": degree,
        "sketch_size": sketch_size, "samples": samples, "ridge": ridge, "finetune": finetune, "beta": beta,
        "lr": lr, "head_lr": head_lr, "val_fraction": val_fraction, "patience": patience, "sparse": sparse, "l1": l1, "baselines": baselines, "latency": latency, "batch_size": batch_size, "data": data,
    }  # fmt: skip
    params["export"] = export

    params["certify"] = certify

    def body(ctx: CommandContext) -> CommandOutput:
        check_request(analyze, cut, finetune, sparse, rank, export)
        export_format = check_export_format(export)
        parsed_rank = parse_rank(rank)
        sub = SubspaceSettings(
            eps=eps,
            sketch_size=sketch_size if sketch_size is not None else default_sketch_size(parsed_rank),
            samples=samples,
            batch_size=batch_size,
            seed=seed,
        )
        settings = None
        if cut is not None:
            settings = ASNetSettings(
                cut=cut, rank=parsed_rank, degree=degree, ridge=ridge, finetune_epochs=finetune, lr=lr, head_lr=head_lr, beta=beta,
                sparse=sparse, l1=l1, baselines=baselines, latency=latency, subspace=sub, val_fraction=val_fraction,
                patience=patience,
            )  # fmt: skip
        # claimed before any work, so a taken --out fails at once (claims are idempotent)
        early = ["asnet.safetensors"] * (cut is not None) + ["spectrum.png"] + ["baselines.png"] * baselines
        for name in early + ["asnet.onnx"] * (export_format is not None):
            ctx.path(name)
        loaded = load_checkpoint(ctx, model_opts)
        require_python_module(loaded, "asnet")
        if cut is not None:  # no registry entry rebuilds the teacher: a self-contained torch.export program
            ctx.path(model_file("asnet", is_registered_teacher(loaded.meta.arch)))
        dataset = load_data(ctx, loaded, data, data_dir, prep=Preprocessing.from_options(normalize, input_shape, layout, pixel_max))
        result = run_asnet(loaded, dataset, settings, sub, ctx.device, analyze=analyze, layers=layers, baselines=baselines,
                           params=ctx.params, inputs=ctx.inputs, progress=ctx.progress, log=ctx.log, dist=ctx.dist,
                           export=export_format)  # fmt: skip
        for warning in result.built.warnings if result.built is not None else []:
            ctx.log(f"[yellow]Warning:[/yellow] {cli_text(warning)}")
        written = result.write_outputs(ctx.path, ctx.force)
        if certify and result.built is not None:
            written["certify"] = certify_student(result.built.model, loaded.model, dataset, ctx)
        return CommandOutput(results={**result.results, **written}, tables=result.tables,
                             headline=[cli_text(line) for line in result.headline])  # fmt: skip

    run_command("asnet", common, inputs={}, params=params, body=body, run_name=checkpoint.stem, distributed=True)

