"""`odekit asnet`: active-subspace analysis of a model's layers and ASNet compression."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Annotated, Any

import typer

from odekit.cli.options import (
    ArchArgsOpt,
    ArchOpt,
    BatchSizeOpt,
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
from odekit.cli.runner import CommandContext, CommandOutput, ResultTable, run_command
from odekit.errors import UsageError
from odekit.io.preprocessing import Preprocessing

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch (issue 12)
    import torch

    from odekit.io.datasets import Dataset
    from odekit.methods.asnet import LayerAnalysis

EPILOG = """Examples:

  odekit asnet checkpoints/vgg11_digits.safetensors --analyze

  odekit asnet checkpoints/vgg11_digits.safetensors --analyze --layers 3-8 --energy-tol 0.05

  odekit asnet checkpoints/vgg11_digits.safetensors --cut 4 --rank 10 --finetune 5 -o runs/asnet4

  odekit asnet checkpoints/lenet5_digits.safetensors --cut 2 --rank auto --finetune 5 --sparse --l1 2

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
FLOPs are 2 x multiply-adds per sample.
"""

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
            help="Active neurons r kept: an integer, or 'auto' for the eps rule (eq. 6.17) "
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
        int, typer.Option("--finetune", min=0, help="Fine-tuning epochs (Adam, cosine schedule).", rich_help_panel=ASNET)
    ] = 0,
    beta: Annotated[
        float, typer.Option("--beta", help="Distillation weight beta of the fine-tuning loss.", rich_help_panel=ASNET)
    ] = 0.1,
    lr: Annotated[float, typer.Option("--lr", help="Fine-tuning learning rate (Adam; thesis: 1e-4 for VGG).", rich_help_panel=ASNET)] = 1e-4,
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
    batch_size: BatchSizeOpt = 128,
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
    """Active-subspace analysis and ASNet compression (thesis ch. 6.2-6.3)."""
    from odekit.cli.common import load_checkpoint, load_data, require_python_module
    from odekit.io.checkpoints import save_model
    from odekit.io.exported import save_exported
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
        "lr": lr, "head_lr": head_lr, "sparse": sparse, "l1": l1, "baselines": baselines, "latency": latency, "batch_size": batch_size, "data": data,
    }  # fmt: skip

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
                sparse=sparse, l1=l1, baselines=baselines, latency=False, subspace=sub,  # timed interleaved below
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
            res = built.results
            res.update(_fidelity_and_latency(loaded.model, built.model, dataset, batch_size, latency, ctx.device))
            _add_accuracy_intervals(res, len(dataset.test))
            step = {
                "command": "asnet",
                "cut": res["cut"]["index"],
                "rank": res["cut"]["rank"],
                "degree": degree,
                "finetune_epochs": finetune,
                "sparse": sparse,
                "test_accuracy": res["asnet"]["accuracy"],
            }
            meta = loaded.meta.derived("asnet", built.args, step, source=loaded.sha256)
            meta.extra = {"test_accuracy": res["asnet"]["accuracy"], "teacher_accuracy": res["teacher"]["accuracy"]}
            if built.registered:
                save_model(model_path, built.model, meta, force=ctx.force)
            else:
                save_exported(model_path, built.model, tuple(shape), meta.to_json(), force=ctx.force)
            results.update(res)
            results["checkpoint"] = str(model_path)
            if not any(a.cut.index == built.cut_analysis.cut.index for a in analyses):
                analyses.append(built.cut_analysis)
            tables += _asnet_tables(res)
            headline.append(
                f"ASNet({res['cut']['index']}), r = {res['cut']['rank']}: accuracy {100 * res['asnet']['accuracy']:.2f}% "
                f"(teacher {100 * res['teacher']['accuracy']:.2f}%, before fine-tuning "
                f"{100 * res['asnet']['accuracy_before_finetune']:.2f}%), storage {res['storage_reduction']:.2f}x smaller, "
                f"FLOPs {res['flop_reduction']:.2f}x fewer"
            )
        results["active_neurons"] = {str(a.cut.index): a.subspace.active_neurons(eps) for a in analyses}
        results.setdefault("warnings", [])
        save_figure(_spectrum_figure(analyses, eps, results.get("cut")), spectrum_path, force=ctx.force)
        if baselines_path is not None:
            save_figure(_baselines_figure(analyses, results), baselines_path, force=ctx.force)
        headline.append(
            "active neurons at eps = "
            + f"{eps}: "
            + ", ".join(f"layer {a.cut.index}: {a.subspace.active_neurons(eps)} of {a.cut.features}" for a in analyses)
        )
        return CommandOutput(results=results, tables=tables, headline=headline)

    run_command("asnet", common, inputs={}, params=params, body=body, run_name=checkpoint.stem, distributed=True)


def _fidelity_and_latency(
    teacher: torch.nn.Module, student: torch.nn.Module, dataset: Dataset, batch_size: int, timed: bool, device: torch.device
) -> dict[str, Any]:
    """Issue 11: top-1 agreement and mean KL on the test split; latency timed teacher/ASNet interleaved."""
    from odekit.methods.evaluation import agreement, compare_latency

    out: dict[str, Any] = agreement(teacher, student, dataset.test, device=device)
    out.pop("samples")
    if timed:
        out["latency"], out["latency_ms"] = {}, {}
        for label, x, repeats in (("batch1", dataset.test.x[:1], 20), (f"batch{min(len(dataset.test), batch_size)}", dataset.test.x[:batch_size], 5)):
            comparison = compare_latency(teacher, student, x, device, warmup=2, repeats=repeats)
            out["latency"][label] = comparison.to_dict()
            out["latency_ms"][f"teacher_ms_{label}"] = statistics.median(comparison.teacher_ms)
            out["latency_ms"][f"asnet_ms_{label}"] = statistics.median(comparison.student_ms)
    return out


def _layer_table(analyses: list[LayerAnalysis]) -> ResultTable:
    rows = []
    for a in analyses:
        d = a.to_dict()
        rows.append([
            d["index"], d["alias"], d["n_l"], d["active_neurons"], d["active_neurons_eq612"],
            d["logreg_accuracy"] if d["logreg_accuracy"] is not None else "-", d["sketch_covariance_error_rel"],
        ])  # fmt: skip
    return ResultTable(
        "Active neurons per layer",
        ["layer", "alias", "n_l", "active (eq. 6.17)", "active (eq. 6.12)", "LR accuracy", "sketch cov. err (rel)"],
        rows,
    )


def _add_accuracy_intervals(res: dict[str, Any], n: int) -> None:
    """Issue 12: the teacher's and the ASNet's test accuracy carry n and a Wilson 95% interval."""
    from odekit.cli.common import accuracy_fields

    for key in ("teacher", "asnet"):
        res[key].update(accuracy_fields(res[key]["accuracy"], n))


def _asnet_tables(res: dict[str, Any]) -> list[ResultTable]:
    from odekit.cli.common import accuracy_text

    split, teacher, asnet = res["split"], res["teacher"], res["asnet"]
    post = split["teacher_post_model"]
    teacher_accuracy = accuracy_text(teacher["accuracy"], teacher["accuracy_n"])
    asnet_accuracy = accuracy_text(asnet["accuracy"], asnet["accuracy_n"])
    rows = [
        ["teacher", teacher_accuracy, teacher["storage_mb"], teacher["flops"], teacher["params"], "-", "-"],
        ["teacher post-model", "-", post["storage_mb"], post["flops"], post["params"], "-", "-"],
        ["ASNet pre-model", "-", split["pre_model"]["storage_mb"], split["pre_model"]["flops"], split["pre_model"]["params"], "-", "-"],
        ["ASNet AS+PCE", "-", split["as_pce"]["storage_mb"], split["as_pce"]["flops"], split["as_pce"]["params"],
         split["post_storage_reduction"], split["post_flop_reduction"]],
        ["ASNet overall", asnet_accuracy, asnet["storage_mb"], asnet["flops"], asnet["params"],
         res["storage_reduction"], res["flop_reduction"]],
    ]  # fmt: skip
    if "nonzero_params" in asnet:
        rows.append(["ASNet-s (non-zeros)", asnet_accuracy, asnet["storage_mb_nonzero"], asnet["flops_nonzero"],
                     asnet["nonzero_params"], teacher["storage_mb"] / max(asnet["storage_mb_nonzero"], 1e-12),
                     teacher["flops"] / max(asnet["flops_nonzero"], 1)])  # fmt: skip
    tables = [
        ResultTable(
            "Storage and FLOPs (thesis table 6.2 layout; FLOPs = 2 x MACs)",
            ["part", "accuracy [Wilson 95%] n", "storage MB", "FLOPs", "params", "storage x", "FLOPs x"],
            rows,
        )
    ]
    base = res["baselines"]
    names = [("as_pce", "AS + PCE (ASNet, no fine-tuning)"), ("pca_pce", "PCA + PCE"), ("as_logreg", "AS + logistic regression"),
             ("pca_logreg", "PCA + logistic regression"), ("logreg_features", "logistic regression on all n_l features")]  # fmt: skip
    tables.append(
        ResultTable(
            f"Baselines at r = {res['cut']['rank']} (test accuracy, no fine-tuning)",
            ["method", "accuracy"],
            [[label, base[key]] for key, label in names if key in base],
        )
    )
    return tables


def _spectrum_figure(analyses: list[LayerAnalysis], eps: float, cut: dict[str, Any] | None = None) -> Any:
    from odekit.writers.plots import new_figure

    fig, axes = new_figure(1, 1, (6.5, 4.2))
    ax = axes[0][0]
    for a in analyses:
        s = a.subspace.singular_values[:200].double()
        s = s[s > 0]
        if s.numel() == 0:
            continue
        k = a.subspace.active_neurons(eps)
        ax.semilogy(range(1, s.numel() + 1), (s / s[0]).numpy(), label=f"layer {a.cut.index} (n={a.cut.features}, active {k})")
        if k <= s.numel():
            ax.plot([k], [float(s[k - 1] / s[0])], "o", color=ax.lines[-1].get_color())
        r = int(cut["rank"]) if cut is not None and cut.get("index") == a.cut.index else 0
        if 1 <= r <= s.numel():  # issue 12: the rank the ASNet really uses
            ax.plot([r], [float(s[r - 1] / s[0])], "x", markersize=10, color=ax.lines[-1].get_color(),
                    label=f"ASNet rank r = {r}")  # fmt: skip
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1 (gradient sketch)")
    ax.set_title(f"Active-subspace spectrum (dots: active neurons at --energy-tol {eps}; x: r used)", fontsize=10)
    if analyses:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def _baselines_figure(analyses: list[LayerAnalysis], results: dict[str, Any]) -> Any:
    from odekit.writers.plots import new_figure

    with_lr = [a for a in analyses if a.logreg_accuracy is not None]
    n = results.get("teacher", {}).get("accuracy_n")
    on = f" (n = {n} test images)" if n else ""
    panels = int(bool(with_lr)) + int("baselines" in results)
    fig, axes = new_figure(max(panels, 1), 1, (5.5, 4.0))
    col = 0
    if with_lr:
        ax = axes[0][col]
        ax.bar([str(a.cut.index) for a in with_lr], [100 * float(a.logreg_accuracy or 0) for a in with_lr], color="tab:red")
        ax.set_xlabel("cut layer")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Logistic regression on layer features{on}", fontsize=10)
        ax.set_ylim(0, 100)  # a full axis: bars cut at 87% exaggerate small gaps
        col += 1
    if "baselines" in results:
        ax = axes[0][col]
        base = results["baselines"]
        keys = [k for k in ("as_pce", "pca_pce", "as_logreg", "pca_logreg", "logreg_features") if k in base]
        labels = {"as_pce": "AS+PCE", "pca_pce": "PCA+PCE", "as_logreg": "AS+LR", "pca_logreg": "PCA+LR", "logreg_features": "LR"}
        values = [100 * float(base[k]) for k in keys]
        ax.bar([labels[k] for k in keys], values, color=["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red"][: len(keys)])
        ax.axhline(100 * results["teacher"]["accuracy"], color="black", linestyle="--", label="teacher")
        ax.set_ylim(0, 112)  # headroom above 100% keeps the legend off the bars
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Cut {results['cut']['index']}, r = {results['cut']['rank']}, no fine-tuning{on}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    return fig
