"""`odekit smoothness-check`: the (S, n)-criterion of thesis 3.3.2 for an ODE classifier."""

from __future__ import annotations

import math
from typing import Annotated

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
from odekit.cli.runner import CommandContext, CommandOutput, run_command
from odekit.errors import UsageError
from odekit.io.preprocessing import Preprocessing

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
    from odekit.api.smoothness import run_smoothness
    from odekit.cli.common import load_checkpoint, load_data
    from odekit.methods.smoothness import SmoothnessSettings, training_config

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
        result = run_smoothness(loaded.model, split, settings, ctx.device, title=checkpoint.name, params=ctx.params,
                                inputs=ctx.inputs, progress=ctx.progress)  # fmt: skip
        written = result.write_outputs(lambda _name: plot_path, ctx.force)
        return CommandOutput(results={**result.results, **written}, tables=result.tables, headline=result.headline)

    run_command("smoothness-check", common, inputs={}, params=params, body=body, run_name=checkpoint.stem)
