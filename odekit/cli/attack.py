"""`odekit attack`: universal perturbations, per-sample attacks, transfer and transfer matrices.

Parses the options, loads the checkpoints and data, and hands them to
`odekit.api.attacks.run_attack` (which `odekit.attack` calls too); the CLI prints its tables."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from odekit.cli.names import ATTACK_HELP, help_line, names
from odekit.cli.options import (
    STREAM_BATCH_SIZE,
    ArchArgsOpt,
    ArchOpt,
    BatchSizeOpt,
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

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch (issue 12)
    from odekit.methods.attacks.pipeline import Player

ATTACK = "Attack options"
UNIVERSAL = "Universal attack options"
PER_SAMPLE = "Per-sample attack options"
TRANSFER = "Transfer options"

EPILOG = f"""Examples:

  odekit attack checkpoints/lenet300_digits.safetensors --method active-subspace --delta 3 -o runs/as

  odekit attack checkpoints/lenet5_digits.safetensors --method uap --delta 3 --max-passes 10 --json

  odekit attack checkpoints/lenet5_digits.safetensors --method active-subspace --delta 1,2,3,4 --seeds 0,1,2

  odekit attack checkpoints/lenet5_digits.safetensors --method as+uap --delta 3 --target 7

  odekit attack checkpoints/lenet5_digits.safetensors --method pgd --norm inf --eps 2/255,4/255,8/255 --restarts 2

  odekit attack checkpoints/lenet5_digits.safetensors --source checkpoints/lenet300_digits.safetensors --method fgsm

  odekit attack --matrix checkpoints/lenet300_digits.safetensors checkpoints/lenet5_digits.safetensors --method active-subspace

  odekit attack ode.safetensors --method pgd --attack-solver euler:2 --eval-solver rk4:8

Methods: {help_line(ATTACK_HELP)}.

Budgets (--delta, --eps) are norms in [0, 1] pixel units, whatever normalisation the model uses
(RobustBench: linf 8/255, l2 0.5); reports give universal vector norms in pixel and in
model-input units. For adef, --eps is the largest displacement (T-norm) in pixels.
Several budgets give one report with a row per budget (+ curve.csv; universal: fooling_rate.png):
active-subspace and random are fitted once and scaled, deepfool and adef run once and are clipped
per budget, the others rerun per budget. Rates come with n and a Wilson 95% interval.
Solver specs: SOLVER[:STEPS[:U]], e.g. euler:2, rk2:8, rk2:4:1.0, rk4:4, dopri5.
--matrix rows are sources (generated on), columns targets (evaluated on).
"""


# the options recorded in report.json's params, in this order (those the method ignores are dropped)
REPORTED = ("method", "norm", "delta", "eps", "target", "s0", "gamma", "backtrack", "alpha", "max_iter",
            "sweep_refine", "k", "subspace_steps", "fit_samples", "max_passes", "target_fooling", "steps",
            "restarts", "random_start", "backend", "sigma", "eval_samples", "attack_solver", "eval_solver",
            "matrix", "units", "seeds", "batch_size", "seed")  # fmt: skip
# the options attack settings are built from, by field name (odekit.methods.attacks.plan)
SETTINGS = ("norm", "target", "s0", "gamma", "backtrack", "alpha", "max_iter", "sweep_refine", "k",
            "subspace_steps", "max_passes", "target_fooling", "steps", "restarts", "random_start",
            "backend", "sigma")  # fmt: skip


def _opt(flags: str, panel: str, text: str, **extra: Any) -> Any:
    """An option of this command: its flags (space-separated), help panel and help text; the
    default is shown unless the text states its own."""
    extra.setdefault("show_default", "[default:" not in text)
    return typer.Option(*flags.split(), help=text, rich_help_panel=panel, **extra)


def attack_command(
    cli: typer.Context,
    checkpoints: Annotated[list[Path], typer.Argument(
        help="Target checkpoint (several with --matrix: each is both source and target).",
        show_default=False, metavar="CHECKPOINT...")],
    method: Annotated[str, _opt("--method -m", ATTACK,
        f"One of: {', '.join(names(ATTACK_HELP))}.")] = "active-subspace",
    norm: Annotated[str, _opt("--norm", ATTACK, "2 | inf (ignored by adef, which uses the T-norm).")] = "2",
    delta: Annotated[str | None, _opt("--delta", UNIVERSAL,
        "Universal budget(s): the l2 or linf norm ||v|| (per --norm) measured in [0, 1]-pixel units, "
        "whatever the model's normalisation; comma-separated for a sweep (one report, a row per budget) "
        "[default: 3.0 for l2, 0.15 for linf].")] = None,
    target: Annotated[int | None, _opt("--target", UNIVERSAL, "Universal: targeted attack, push inputs "
        "to this class (success = predicted as it).", show_default=False)] = None,
    s0: Annotated[float | None, _opt("--s0", UNIVERSAL,
        "Active subspace: first step length [default: 2*delta].")] = None,
    gamma: Annotated[float, _opt("--gamma", UNIVERSAL, "Active subspace: backtracking decrease ratio.")] = 0.5,
    backtrack: Annotated[int, _opt("--backtrack", UNIVERSAL,
        "Active subspace: step lengths tried per iteration.")] = 10,
    alpha: Annotated[int, _opt("--alpha", UNIVERSAL, "Active subspace: stop after more than alpha failures.")] = 10,
    max_iter: Annotated[int, _opt("--max-iters", UNIVERSAL, "Active subspace: iteration limit.")] = 100,
    sweep_refine: Annotated[int, _opt("--sweep-refine", UNIVERSAL, "Active subspace sweeps: warm-started "
        "iterations per budget below the largest (0: scale the largest budget's vector only).")] = 3,
    k: Annotated[int, _opt("--k", UNIVERSAL, "as-k: dimension of the active subspace searched.")] = 16,
    subspace_steps: Annotated[int, _opt("--subspace-steps", UNIVERSAL,
        "as-k: projected gradient steps in the subspace.")] = 20,
    fit_samples: Annotated[int, _opt("--fit-samples", UNIVERSAL,
        "Training samples the universal vector is fitted on.", min=1)] = 200,
    max_passes: Annotated[int, _opt("--max-passes", UNIVERSAL, "UAP: passes over the fitting samples.")] = 10,
    target_fooling: Annotated[float, _opt("--target-fooling", UNIVERSAL,
        "UAP: stop once this fit fooling rate is reached.")] = 0.8,
    eps: Annotated[str | None, _opt("--eps", PER_SAMPLE, "Per-sample budget(s), comma-separated, "
        "fractions allowed [default: 8/255 linf, 0.5 l2, 1 pixel adef].")] = None,
    steps: Annotated[int | None, _opt("--iters", PER_SAMPLE,
        "PGD/DeepFool/ADef iterations [default: 40 linf PGD, 50 l2 PGD, 50].")] = None,
    restarts: Annotated[int, _opt("--restarts", PER_SAMPLE,
        "PGD restarts (a sample is broken if any restart breaks it).")] = 1,
    random_start: Annotated[bool, _opt("--random-start/--no-random-start", PER_SAMPLE,
        "PGD random start in the eps ball.")] = True,
    backend: Annotated[str, _opt("--backend", PER_SAMPLE,
        "fgsm/pgd/deepfool implementation: foolbox | torch.")] = "foolbox",
    sigma: Annotated[float, _opt("--sigma", PER_SAMPLE,
        "ADef: Gaussian smoothing of the vector field, pixels.")] = 1.0,
    units: Annotated[str, _opt("--units", ATTACK, "Units of --delta/--eps: pixel ([0, 1] pixels) or model "
        "(model-input units, i.e. pixels divided by the normalisation std, as in the thesis).")] = "pixel",
    seeds: Annotated[str | None, _opt("--seeds", ATTACK, "Repeat the run for each seed (comma-separated; "
        "fit/eval samples and attack randomness) and report mean and spread [default: --seed once].")] = None,
    eval_samples: Annotated[int | None, _opt("--eval-samples", ATTACK,
        "Held-out samples to evaluate on [default: the whole test split].", min=1)] = None,
    source: Annotated[Path | None, _opt("--source", TRANSFER,
        "Generate the attack on this model, evaluate on the target (black-box transfer).")] = None,
    attack_solver: Annotated[str | None, _opt("--attack-solver", TRANSFER,
        "ODE models: solver spec used to generate the attack (grey-box).")] = None,
    eval_solver: Annotated[str | None, _opt("--eval-solver", TRANSFER,
        "ODE models: solver spec used to evaluate it.")] = None,
    matrix: Annotated[bool, _opt("--matrix", TRANSFER,
        "Source x target fooling-rate matrix over all given checkpoints.")] = False,
    batch_size: BatchSizeOpt = STREAM_BATCH_SIZE,
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
    """Attack a model: universal perturbations (active subspace, UAP, random), per-sample attacks
    (FGSM, PGD, DeepFool, ADef), black-box/grey-box transfer and transfer matrices."""
    from odekit.methods.attacks.pipeline import splits_over_ranks

    common = CommonOptions(
        device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads
    )
    params: dict[str, Any] = {key: cli.params[key] for key in REPORTED}

    def load(ctx: CommandContext, path: Path, key: str, prep: Preprocessing) -> Player:
        from odekit.cli.common import load_checkpoint, load_data
        from odekit.methods.attacks.pipeline import Player

        loaded = load_checkpoint(ctx, ModelOptions(path, arch, num_classes, trust_checkpoint, arch_args), key=key)
        data_key = "data" if key == "checkpoint" else f"{key}_data"
        dataset = load_data(ctx, loaded, data, data_dir, key=data_key, prep=prep)
        return Player.from_loaded(path, loaded.sha256, loaded.model, dataset)

    def body(ctx: CommandContext) -> CommandOutput:
        from odekit.api.attacks import run_attack
        from odekit.cli.errors import cli_text
        from odekit.methods.attacks import parse_solver_spec
        from odekit.methods.attacks import pipeline as run
        from odekit.methods.attacks.experiments import Scoring
        from odekit.methods.attacks.plan import build_plan, parse_budgets, parse_seeds

        prep = Preprocessing.from_options(normalize, input_shape, layout, pixel_max)
        unit = run.parse_units(units, budget_given=delta is not None or eps is not None)
        options = {
            **{key: params[key] for key in SETTINGS},
            "delta": parse_budgets(delta, "--delta") if delta is not None else None,
            "eps": parse_budgets(eps, "--eps") if eps is not None else None,
        }
        base_plan = build_plan(method, options)  # validates options before loading
        run.drop_unused_params(ctx.params, base_plan, options)
        seed_list = parse_seeds(seeds) if seeds is not None else [ctx.seed]
        specs = (
            parse_solver_spec(attack_solver) if attack_solver else None,
            parse_solver_spec(eval_solver) if eval_solver else None,
        )
        paths = {name: ctx.path(name) for name in run.output_names(base_plan, matrix)}  # before any heavy work
        score = Scoring(seed=ctx.seed, batch_size=batch_size, device=ctx.device, progress=ctx.progress,
                        dist=ctx.dist)  # fmt: skip
        if matrix:
            if len(checkpoints) < 2:
                raise UsageError("--matrix needs at least two checkpoints", "odekit attack --matrix A B C ...")
            if source is not None or seeds is not None:
                raise UsageError(
                    f"--matrix and {'--source' if source is not None else '--seeds'} do not combine",
                    "--matrix already uses every model as a source; it runs with --seed",
                )
            players = [load(ctx, p, "checkpoint" if i == 0 else f"checkpoint_{i + 1}", prep)
                       for i, p in enumerate(checkpoints)]  # fmt: skip
        else:
            if len(checkpoints) != 1:
                raise UsageError(
                    f"got {len(checkpoints)} checkpoints", "attack one model, or pass --matrix for a transfer matrix"
                )
            players = [load(ctx, checkpoints[0], "checkpoint", prep)]
            if source is not None:
                players.append(load(ctx, source, "source", prep))
        result = run_attack(method, options, base_plan, unit, players, score=score, seeds=seed_list,
                            fit_samples=fit_samples, eval_samples=eval_samples, params=ctx.params, inputs=ctx.inputs,
                            matrix=matrix, specs=specs)  # fmt: skip
        written = result.write_outputs(paths.__getitem__, ctx.force)
        return CommandOutput({**result.results, **written}, result.tables, [cli_text(line) for line in result.headline])

    run_command("attack", common, inputs={}, params=params, body=body, run_name=method,
                distributed=splits_over_ranks(method, matrix))  # fmt: skip
