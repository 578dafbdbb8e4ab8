"""`odekit asnet`: active-subspace analysis of a model's layers and ASNet compression."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from odekit.cli.asnet_figures import baselines_figure, spectrum_figure
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
    SeedOpt,
    ThreadsOpt,
    TrustOpt,
    ValFractionOpt,
)
from odekit.cli.runner import CommandContext, CommandOutput, ResultTable, run_command
from odekit.errors import UsageError
from odekit.io.preprocessing import Preprocessing

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch (issue 12)
    from pathlib import Path

    from odekit.io.checkpoints import LoadedModel
    from odekit.methods.asnet import ASNetResult, LayerAnalysis
    from odekit.methods.evaluation import ModelCost

_baselines_figure = baselines_figure  # the name tests and older callers import

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
    from odekit.cli.common import load_checkpoint, load_data, require_python_module
    from odekit.methods.asnet import (
        ASNetSettings,
        SubspaceSettings,
        analyze_layers,
        build_asnet_from_teacher,
        cut_model,
        default_sketch_size,
        is_registered_teacher,
        parse_rank,
    )
    from odekit.writers.plots import save_figure

    common = CommonOptions(device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads)
    model_opts = ModelOptions(checkpoint, arch, num_classes, trust_checkpoint, arch_args)
    analyze = analyze or layers is not None
    params: dict[str, Any] = {
        "analyze": analyze, "layers": layers, "cut": cut, "rank": rank, "eps": eps, "degree": degree,
        "sketch_size": sketch_size, "samples": samples, "ridge": ridge, "finetune": finetune, "beta": beta,
        "lr": lr, "head_lr": head_lr, "val_fraction": val_fraction, "patience": patience, "sparse": sparse, "l1": l1, "baselines": baselines, "latency": latency, "batch_size": batch_size, "data": data,
    }  # fmt: skip

    params["certify"] = certify

    def body(ctx: CommandContext) -> CommandOutput:
        if not analyze and cut is None:
            raise UsageError("nothing to do", "give --cut LAYER to build an ASNet and/or --analyze to study layers")
        if cut is None and (finetune or sparse or rank is not None):
            raise UsageError("--rank, --finetune and --sparse belong to an ASNet build", "add --cut LAYER")
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
        model_path = ctx.path("asnet.safetensors") if cut is not None else None
        spectrum_path = ctx.path("spectrum.png")
        baselines_path = ctx.path("baselines.png") if baselines else None

        loaded = load_checkpoint(ctx, model_opts)
        require_python_module(loaded, "asnet")
        if model_path is not None and not is_registered_teacher(loaded.meta.arch):
            # no registry entry rebuilds the teacher: a self-contained torch.export program
            model_path = ctx.path("asnet.pt2")
        dataset = load_data(ctx, loaded, data, data_dir, prep=Preprocessing.from_options(normalize, input_shape, layout, pixel_max))
        shape = loaded.input_shape or dataset.input_shape
        results: dict[str, Any] = {}
        tables: list[ResultTable] = []
        headline: list[str] = []
        analyses: list[LayerAnalysis] = []
        used: tuple[int, int] | None = None
        if analyze:
            chain = cut_model(loaded.model, shape)
            analyses = analyze_layers(
                chain, layers, dataset, sub, ctx.device, logreg=baselines, progress=ctx.progress, dist=ctx.dist
            )
            results["layers"] = [a.to_dict() for a in analyses]
            tables.append(_layer_table(analyses))
        if settings is not None and model_path is not None:
            built = build_asnet_from_teacher(
                loaded.model, loaded.meta.arch, loaded.meta.args, shape, dataset, settings, ctx.device,
                progress=ctx.progress, log=ctx.log, dist=ctx.dist,
            )  # fmt: skip
            for warning in built.warnings:
                ctx.log(f"[yellow]Warning:[/yellow] {warning}")
            _save_asnet(built, loaded, model_path, shape, ctx)
            results.update(built.to_dict())
            results["checkpoint"] = str(model_path)
            if certify:
                results["certify"] = certify_student(built.model, loaded.model, dataset, ctx)
            used = (built.cut.cut.index, built.cut.rank)
            if not any(a.cut.index == built.cut_analysis.cut.index for a in analyses):
                analyses.append(built.cut_analysis)
            tables += _asnet_tables(built)
            headline.append(_asnet_headline(built))
            if built.history is not None:
                headline.append(built.history.summary())
                tables.append(history_table(built.history))
                history_path = ctx.path(FINETUNE_PLOT)
                save_figure(history_figure(built.history, f"ASNet cut {built.cut.cut.index}: fine-tuning"), history_path,
                            force=ctx.force)  # fmt: skip
                results["finetune"]["plot"] = str(history_path)
        results["active_neurons"] = {str(a.cut.index): a.subspace.active_neurons(eps) for a in analyses}
        results.setdefault("warnings", [])
        save_figure(spectrum_figure(analyses, eps, used), spectrum_path, force=ctx.force)
        if baselines_path is not None:
            save_figure(baselines_figure(analyses, results), baselines_path, force=ctx.force)
        headline.append(
            "active neurons at eps = "
            + f"{eps}: "
            + ", ".join(f"layer {a.cut.index}: {a.subspace.active_neurons(eps)} of {a.cut.features}" for a in analyses)
        )
        return CommandOutput(results=results, tables=tables, headline=headline)

    run_command("asnet", common, inputs={}, params=params, body=body, run_name=checkpoint.stem, distributed=True)


def _save_asnet(built: ASNetResult, loaded: LoadedModel, path: Path, shape: Any, ctx: CommandContext) -> None:
    """The ASNet as an odekit checkpoint (or a .pt2 program), its history step recorded."""
    from odekit.io.checkpoints import save_model
    from odekit.io.exported import save_exported

    compared = built.comparison
    step = {
        "command": "asnet",
        "cut": built.cut.cut.index,
        "rank": built.cut.rank,
        "degree": built.cut.degree,
        "finetune_epochs": built.finetune.epochs,
        "sparse": built.finetune.sparse,
        "test_accuracy": compared.student.accuracy,
    }
    meta = loaded.meta.derived("asnet", built.args, step, source=loaded.sha256)
    meta.extra = {"test_accuracy": compared.student.accuracy, "teacher_accuracy": compared.teacher.accuracy}
    if built.registered:
        save_model(path, built.model, meta, force=ctx.force)
    else:
        save_exported(path, built.model, tuple(shape), meta.to_json(), force=ctx.force)


def _asnet_headline(built: ASNetResult) -> str:
    compared = built.comparison
    return (
        f"ASNet({built.cut.cut.index}), r = {built.cut.rank}: accuracy {100 * compared.student.accuracy:.2f}% "
        f"(teacher {100 * compared.teacher.accuracy:.2f}%, before fine-tuning "
        f"{100 * (compared.student_before or 0.0):.2f}%), storage {compared.storage_reduction:.2f}x smaller, "
        f"FLOPs {compared.flop_reduction:.2f}x fewer"
    )


def _layer_table(analyses: list[LayerAnalysis]) -> ResultTable:
    rows = [
        [a.cut.index, a.cut.alias, a.cut.features, a.subspace.active_neurons(a.eps), a.subspace.active_neurons_eq612(a.eps),
         a.logreg_accuracy if a.logreg_accuracy is not None else "-", a.subspace.covariance_error_rel]
        for a in analyses
    ]  # fmt: skip
    return ResultTable(
        "Active neurons per layer",
        ["layer", "alias", "n_l", "active (eq. 6.17)", "active (eq. 6.12)", "LR accuracy", "sketch cov. err (rel)"],
        rows,
    )


BASELINE_LABELS = {
    "as_pce": "AS + PCE (ASNet, no fine-tuning)",
    "pca_pce": "PCA + PCE",
    "as_logreg": "AS + logistic regression",
    "pca_logreg": "PCA + logistic regression",
    "logreg_features": "logistic regression on all n_l features",
}


def _asnet_tables(built: ASNetResult) -> list[ResultTable]:
    from odekit.cli.common import accuracy_text

    compared, split = built.comparison, built.split
    teacher, asnet = compared.teacher, compared.student
    teacher_accuracy = accuracy_text(teacher.accuracy, teacher.n)
    asnet_accuracy = accuracy_text(asnet.accuracy, asnet.n)

    def cost(part: ModelCost) -> list[Any]:  # storage MB (4 digits, as in report.json), FLOPs, params
        d = part.to_dict()
        return [d["storage_mb"], d["flops"], d["params"]]

    split_dict = split.to_dict()
    rows = [
        ["teacher", teacher_accuracy, *cost(teacher.cost), "-", "-"],
        ["teacher post-model", "-", *cost(split.teacher_post_model), "-", "-"],
        ["ASNet pre-model", "-", *cost(split.pre_model), "-", "-"],
        ["ASNet AS+PCE", "-", *cost(split.as_pce), split_dict["post_storage_reduction"], split_dict["post_flop_reduction"]],
        ["ASNet overall", asnet_accuracy, *cost(asnet.cost), compared.storage_reduction, compared.flop_reduction],
    ]
    sparse = built.sparse_cost
    if sparse is not None:
        teacher_cost = teacher.cost.to_dict()
        rows.append(["ASNet-s (non-zeros)", asnet_accuracy, sparse.storage_mb_nonzero, sparse.flops_nonzero,
                     sparse.nonzero_params, teacher_cost["storage_mb"] / max(sparse.storage_mb_nonzero, 1e-12),
                     teacher_cost["flops"] / max(sparse.flops_nonzero, 1)])  # fmt: skip
    return [
        ResultTable(
            "Storage and FLOPs (thesis table 6.2 layout; FLOPs = 2 x MACs)",
            ["part", "accuracy [Wilson 95%] n", "storage MB", "FLOPs", "params", "storage x", "FLOPs x"],
            rows,
        ),
        ResultTable(
            f"Baselines at r = {built.cut.rank} (test accuracy, no fine-tuning)",
            ["method", "accuracy"],
            [[BASELINE_LABELS[key], value] for key, value in built.baselines.accuracies().items()],
        ),
    ]
