"""`odekit smoothness-check`: the (S, n)-criterion of thesis 3.3.2 for an ODE classifier."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from odekit.cli.options import (
    STREAM_BATCH_SIZE,
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
    from odekit.methods.smoothness import SmoothnessResult

CRITERION = "Criterion options"

EPILOG = """Examples:

  odekit smoothness-check checkpoints/odenet4_digits_euler.safetensors

  odekit smoothness-check model.safetensors --solvers euler,rk2,rk4 --steps 2,4,8,16,32 --json

  odekit smoothness-check model.safetensors --solvers rk2 --u 1.0 --steps 4,8 --tolerance 0.005

Verdict: the dynamics are smooth when every tested (solver, n) that spends more f-evaluations
per forward pass than the training solver keeps test accuracy >= the training solver's accuracy
minus --tolerance. n = steps over [0, t1]; NFE = stages x n x ODE blocks. Writes grid.png
(accuracy vs NFE, one line per solver, like thesis fig. 3.1), report.json and report.md.
"""


def _list(text: str, what: str) -> list[str]:
    items = [v.strip() for v in text.split(",") if v.strip()]
    if not items:
        raise UsageError(f"{what} is empty", f"give a comma-separated list for {what}")
    return items


def _steps(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in _list(text, "--steps"))
    except ValueError:
        raise UsageError(f"cannot read --steps '{text}'", "give comma-separated positive integers, e.g. 2,4,8,16") from None


def _plot(path: Path, result: SmoothnessResult, title: str, force: bool, tolerance: float, n: int) -> None:
    """Accuracy against NFE per test solver, with Wilson 95% bars over the n test images and the
    threshold (training accuracy - tolerance) that stronger configurations must stay above."""
    from odekit.stats import wilson_interval
    from odekit.writers.plots import new_figure, save_figure

    fig, axes = new_figure(1, 1, (6.0, 4.2))
    ax = axes[0][0]
    styles = {"euler": "o-", "rk2": "s--", "rk4": "^:"}
    for solver in dict.fromkeys(g.solver for g in result.grid):
        rows = [g for g in result.grid if g.solver == solver]
        accuracies = [g.accuracy for g in rows]
        bounds = [wilson_interval(round(a * n), n) for a in accuracies]
        bars = [[a - low for a, (low, _) in zip(accuracies, bounds, strict=True)],
                [high - a for a, (_, high) in zip(accuracies, bounds, strict=True)]]  # fmt: skip
        ax.errorbar([g.nfe for g in rows], accuracies, yerr=bars, fmt=styles.get(solver, "o-"), capsize=3,
                    label=f"test: {solver}")  # fmt: skip
    train = result.training_solver
    label = f"training: {train['solver']}" + (f" n={train['steps']}" if train.get("steps") else "")
    ax.axhline(result.training_accuracy, color="gray", lw=0.8)
    ax.axhline(result.training_accuracy - tolerance, color="tab:red", lw=0.8, ls="--",
               label=f"threshold: training - {tolerance:g}")  # fmt: skip
    ax.plot([result.training_nfe], [result.training_accuracy], "k*", ms=12, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("f evaluations per forward pass (NFE)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"{title}:\n{'smooth' if result.smooth else 'NOT smooth'} by the (S, n)-criterion, "
                 f"n = {n} test images (bars: Wilson 95%)", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend()
    save_figure(fig, path, force)


def smoothness_command(
    checkpoint: CheckpointArg,
    solvers: Annotated[str, typer.Option("--solvers", help="Test solvers (fixed-step): euler, rk2, rk4.", rich_help_panel=CRITERION)] = "euler,rk2,rk4",
    steps: Annotated[str, typer.Option("--steps", help="Step counts n to test with each solver.", rich_help_panel=CRITERION)] = "2,4,8,16,32",
    u: Annotated[float, typer.Option("--u", help="RK2(u) parameter of the rk2 test solver, in (0, 1].", rich_help_panel=CRITERION)] = 0.5,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Accuracy drop (fraction) still counted as 'holds'.", rich_help_panel=CRITERION)] = 0.01,
    samples: Annotated[int | None, typer.Option("--eval-samples", min=1, help="Test samples to use (seeded subset) [all].", show_default=False)] = None,
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
) -> None:  # fmt: skip
    """Does accuracy hold when the test solver is stronger than the training one? (thesis 3.3.2)"""
    from odekit.cli.common import load_checkpoint, load_data
    from odekit.methods.smoothness import SmoothnessSettings, smoothness_check, training_config

    common = CommonOptions(device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads)
    opts = ModelOptions(checkpoint, arch, num_classes, trust_checkpoint, arch_args)
    params = {"solvers": solvers, "steps": steps, "u": u, "tolerance": tolerance, "samples": samples,
              "data": data, "batch_size": batch_size, "seed": seed}  # fmt: skip

    def body(ctx: CommandContext) -> CommandOutput:
        if not math.isfinite(u):
            raise UsageError(f"rk2 parameter u must lie in (0, 1], got {u}")
        settings = SmoothnessSettings(tuple(_list(solvers, "--solvers")), _steps(steps), u, tolerance, batch_size)
        plot_path = ctx.path("grid.png")
        loaded = load_checkpoint(ctx, opts)
        training_config(loaded.model)  # a non-ODE model fails here, before any data is read
        dataset = load_data(ctx, loaded, data, data_dir, prep=Preprocessing.from_options(normalize, input_shape, layout, pixel_max))
        split = dataset.test.subset(samples, seed)
        result = smoothness_check(loaded.model, split, settings, ctx.device, progress=ctx.progress)
        _plot(plot_path, result, checkpoint.name, ctx.force, tolerance, len(split))
        results = {**result.to_dict(), "samples": len(split), "tolerance": tolerance, "plot": str(plot_path)}
        train = result.training_solver
        train_text = f"{train['solver']} n={train['steps']}" if train.get("steps") else f"{train['solver']} rtol={train['rtol']:g}"
        verdict = "SMOOTH" if result.smooth else "NOT SMOOTH"
        headline = [
            f"{checkpoint.name}: {verdict} by the (S, n)-criterion on {len(split)} test images. Training solver {train_text}: accuracy "
            f"{result.training_accuracy:.4f} at {result.training_nfe:g} NFE; worst stronger solver "
            f"{result.worst.solver} n={result.worst.n}: {result.worst.accuracy:.4f}" if result.worst else "",
            f"Rule: {result.rule}",
        ]
        rows = [[g.solver, g.n, g.nfe, g.accuracy, g.change, "yes" if g.stronger else "no"] for g in result.grid]
        table = ResultTable("Accuracy by test solver", ["solver", "n", "NFE", "accuracy", "change vs training", "stronger"], rows)
        return CommandOutput(results=results, tables=[table], headline=headline)

    run_command("smoothness-check", common, inputs={}, params=params, body=body, run_name=checkpoint.stem)
