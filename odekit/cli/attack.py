"""`odekit attack`: universal perturbations, per-sample attacks, transfer and transfer matrices."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from odekit.cli.names import ATTACK_HELP, help_line, names
from odekit.cli.options import (
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
from odekit.cli.runner import CommandContext, CommandOutput, ResultTable, run_command
from odekit.errors import DataError, UsageError
from odekit.io.preprocessing import Preprocessing

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch (issue 12)
    from torch import Tensor, nn

    from odekit.io.datasets import Dataset
    from odekit.methods.attacks import SolverSpec
    from odekit.methods.attacks.experiments import AttackRun, Scoring
    from odekit.methods.attacks.plan import AttackPlan

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


@dataclass
class Player:
    """A loaded model in pixel space with its data."""

    label: str
    path: Path
    sha256: str
    model: nn.Module
    data: Dataset


def _load_player(
    ctx: CommandContext,
    path: Path,
    key: str,
    model_opts: dict[str, Any],
    data: str | None,
    data_dir: Path | None,
    prep: Preprocessing | None = None,
) -> Player:
    from odekit.cli.common import load_checkpoint, load_data
    from odekit.methods.attacks import pixel_model

    loaded = load_checkpoint(ctx, ModelOptions(checkpoint=path, **model_opts), key=key)
    data_key = "data" if key == "checkpoint" else f"{key}_data"
    dataset = load_data(ctx, loaded, data, data_dir, key=data_key, prep=prep)
    return Player(path.stem, path, loaded.sha256, pixel_model(loaded.model, dataset), dataset)


def _same_inputs(players: list[Player]) -> None:
    first = players[0]
    for other in players[1:]:
        if tuple(other.data.input_shape) != tuple(first.data.input_shape):
            raise DataError(
                f"'{other.path}' takes inputs of shape {tuple(other.data.input_shape)}, '{first.path}' takes "
                f"{tuple(first.data.input_shape)}",
                "transfer needs models with the same input shape",
            )
        if other.data.name != first.data.name:
            raise DataError(
                f"'{other.path}' was trained on '{other.data.name}', '{first.path}' on '{first.data.name}'",
                "transfer needs models of the same data set (or pass --data)",
            )


def _write_tensors(
    path: Path, tensors: dict[str, Tensor], metadata: dict[str, Any], force: bool
) -> None:
    from safetensors.torch import save_file

    from odekit.writers.atomic import atomic_write_with

    state = {k: v.detach().cpu().float().clone().contiguous() for k, v in tensors.items()}
    meta = {"odekit_attack": json.dumps(metadata, sort_keys=True), "format": "pt"}
    atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata=meta), force)


def _drop_unused_params(params: dict[str, Any], plan: AttackPlan, options: dict[str, Any]) -> None:
    """Keep in the report only the options the chosen method uses (issue 12): an active-subspace run
    lists no --max-passes or --sigma, and no budget option left at null next to the resolved one."""
    attack = plan.attack
    used = {f.name for f in fields(attack.settings_type)}
    if attack.fixed_distance is not None:
        used.discard("norm")  # adef's T-norm, whatever --norm says
    for key in options:
        if key not in used or params.get(key) is None:
            params.pop(key, None)
    if not plan.universal:
        params.pop("fit_samples", None)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _mode(source: Player | None, specs: tuple[Any, Any]) -> str:
    if source is not None:
        return "black-box transfer"
    if specs != (None, None) and str(specs[0]) != str(specs[1]):
        return "grey-box (solver transfer)"
    return "white-box"


@dataclass(frozen=True)
class Roles:
    """The scored model, the model that generates the attack (itself unless --source) and the
    solvers each integrates with."""

    target: Player
    source: Player | None
    specs: tuple[SolverSpec | None, SolverSpec | None]

    @property
    def generator(self) -> Player:
        return self.source or self.target

    def models(self) -> tuple[nn.Module, nn.Module]:
        from odekit.methods.attacks import with_solver

        return (with_solver(self.generator.model, self.specs[0], "--attack-solver"),
                with_solver(self.target.model, self.specs[1], "--eval-solver"))  # fmt: skip


def _scoring(ctx: CommandContext, batch_size: int, seed: int, source: Player | None = None,
             specs: tuple[Any, Any] = (None, None)) -> Scoring:  # fmt: skip
    from odekit.methods.attacks.experiments import Scoring

    return Scoring(
        seed=seed, batch_size=batch_size, device=ctx.device, progress=ctx.progress,
        transfer=source is not None or specs != (None, None), mode=_mode(source, specs),
        dist=ctx.dist,
    )  # fmt: skip


def _splits_over_ranks(method: str, matrix: bool) -> bool:
    """Whether a torchrun launch of this run shards its work (issue 15): single-model runs of
    active-subspace, random and every per-sample attack; every other run refuses."""
    from odekit.methods.attacks import ATTACKS

    return not matrix and method in ATTACKS and ATTACKS.get(method).supports_distributed


def _over_seeds(seeds: list[int], experiment: Callable[[int], AttackRun]) -> AttackRun:
    """The first seed's run, with mean and spread over all seeds added to its results."""
    from odekit.methods.attacks.experiments import combine_seeds

    runs = [experiment(seed) for seed in seeds]
    if len(seeds) > 1:
        runs[0].results.update(combine_seeds(runs, seeds))
    return runs[0]


def _save(ctx: CommandContext, paths: dict[str, Path], run: AttackRun, tensors_name: str | None,
          plan: AttackPlan) -> None:  # fmt: skip
    from odekit.methods.attacks.experiments import curve_csv, sweep_plot
    from odekit.writers.atomic import atomic_write_text
    from odekit.writers.plots import save_figure

    if tensors_name is not None:
        _write_tensors(paths[tensors_name], run.tensors, run.metadata, ctx.force)
    if "curve.csv" in paths:
        run.results["curve_csv_path"] = str(paths["curve.csv"])
        atomic_write_text(paths["curve.csv"], curve_csv(run.results), ctx.force)
    if "fooling_rate.png" in paths:
        run.results["curve_figure_path"] = str(paths["fooling_rate.png"])
        run.figures["fooling_rate.png"] = sweep_plot(run.results, plan.attack.distance)
    for name, figure in run.figures.items():
        save_figure(figure, paths[name], ctx.force)


def _rate(point: dict[str, Any], key: str) -> str:
    low, high = point[f"{key}_ci95"]
    return f"{100 * point[key]:.1f}% [{100 * low:.1f}, {100 * high:.1f}]"


def _seed_column(results: dict[str, Any], i: int) -> list[str]:
    if "across_seeds" not in results:
        return []
    stats = results["across_seeds"][i]["fooling_rate_test"]
    return [f"{100 * stats['mean']:.1f} ± {100 * stats['std']:.1f}%"]


def _seed_header(results: dict[str, Any]) -> list[str]:
    n = len(results.get("seeds", []))
    return [f"test fooling over {n} seeds"] if n else []


def _universal(
    ctx: CommandContext,
    paths: dict[str, Path],
    plan: AttackPlan,
    roles: Roles,
    seeds: list[int],
    fit_samples: int,
    eval_samples: int | None,
    batch_size: int,
) -> CommandOutput:
    from odekit.methods.attacks import UniversalAttack
    from odekit.methods.attacks.experiments import universal_experiment

    vec_path, fig_path = paths["perturbation.safetensors"], paths["attack.png"]
    attack = plan.attack
    assert isinstance(attack, UniversalAttack)
    attack_model, eval_model = roles.models()
    gen = roles.generator
    provenance = {"model_sha256": gen.sha256, "model_path": str(gen.path),
                  "target_sha256": roles.target.sha256}  # fmt: skip
    run = _over_seeds(seeds, lambda seed: universal_experiment(
        attack, attack_model, eval_model, gen.data, roles.target.data,
        _scoring(ctx, batch_size, seed, roles.source, roles.specs),
        fit_samples=fit_samples, eval_samples=eval_samples, provenance=provenance,
        budgets=plan.budgets,
    ))  # fmt: skip
    results = run.results
    results["perturbation_path"], results["figure_path"] = str(vec_path), str(fig_path)
    _save(ctx, paths, run, "perturbation.safetensors", plan)
    curve = results["curve"]
    norm = plan.norm
    rows = [
        [_fmt(p["delta"]), _rate(p, "fooling_rate_test"), _fmt(p["fooling_rate_fit"]),
         _fmt(p["robust_accuracy"]), _fmt(p["norm_pixel"]), _fmt(p["seconds"]),
         *_seed_column(results, i)]
        for i, p in enumerate(curve)
    ]  # fmt: skip
    headers = ["delta (px)", "test fooling [95% CI]", "fit fooling", "robust accuracy",
               f"||v||_{norm} (px)", "seconds", *_seed_header(results)]  # fmt: skip
    what = "test fooling rate" if attack.target is None else f"targeted success (class {attack.target})"
    headline = [
        f"{plan.method}: {what} "
        + ", ".join(f"{_rate(p, 'fooling_rate_test')} @ ||v||_{norm} <= {p['delta']:.4g}" for p in curve)
        + f" (pixels, n={curve[0]['fooling_samples_test']}); {results['seconds']:.2f} s"
        + (f", of which {results['fit_seconds']:.2f} s shared fit" if results["fit_seconds"] else "")
    ]
    title = "Universal attack" + (" (sweep)" if len(curve) > 1 else "")
    return CommandOutput(results, [ResultTable(title, headers, rows)], headline)


def _per_sample(
    ctx: CommandContext,
    paths: dict[str, Path],
    plan: AttackPlan,
    roles: Roles,
    seeds: list[int],
    eval_samples: int | None,
    batch_size: int,
) -> CommandOutput:
    from odekit.methods.attacks import PerSampleAttack
    from odekit.methods.attacks.experiments import per_sample_experiment

    attack = plan.attack
    assert isinstance(attack, PerSampleAttack)
    attack_model, eval_model = roles.models()
    provenance = {"model_sha256": roles.generator.sha256, "target_sha256": roles.target.sha256}
    run = _over_seeds(seeds, lambda seed: per_sample_experiment(
        attack, plan.budgets, attack_model, eval_model, roles.target.data,
        _scoring(ctx, batch_size, seed, roles.source, roles.specs),
        eval_samples=eval_samples, provenance=provenance,
    ))  # fmt: skip
    results = run.results
    results["perturbation_path"] = str(paths["perturbations.safetensors"])
    results["figure_path"] = str(paths["attack.png"])
    results["curve_path"] = str(paths["robust_accuracy.png"])
    _save(ctx, paths, run, "perturbations.safetensors", plan)
    curve = results["curve"]
    rows = [
        [_fmt(p["eps"]), _rate(p, "robust_accuracy"), _rate(p, "fooling_rate"),
         _fmt(p["mean_size"]), _fmt(p["seconds"]), *_seed_column(results, i)]
        for i, p in enumerate(curve)
    ]  # fmt: skip
    headers = ["eps", "robust accuracy [95% CI]", "fooling rate [95% CI]", "mean size",
               "seconds", *_seed_header(results)]  # fmt: skip
    headline = [
        f"{plan.method}: clean accuracy {100 * results['clean_accuracy']:.1f}%, robust accuracy "
        + ", ".join(f"{100 * p['robust_accuracy']:.1f}% @ {p['eps']:.4g}" for p in curve)
        + f" (n={results['test_samples']})"
    ]
    return CommandOutput(results, [ResultTable("Robust accuracy", headers, rows)], headline)


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()
    )


@contextlib.contextmanager
def _solver_memory_guard(specs: tuple[SolverSpec | None, SolverSpec | None]) -> Iterator[None]:
    """An out-of-memory while integrating with a fixed-step solver given on the command line is
    blamed on its step count (memory for the gradient grows with steps x batch), not on
    --batch-size alone."""
    try:
        yield
    except BaseException as exc:
        given = [(role, spec) for role, spec in zip(("--attack-solver", "--eval-solver"), specs,
                                                      strict=True) if spec is not None]  # fmt: skip
        if not given or not _is_out_of_memory(exc):
            raise
        named = ", ".join(f"{role} {spec}" for role, spec in given)
        raise UsageError(
            f"out of memory while running the ODE blocks with {named}",
            "every solver step keeps its states for the gradient: lower the step count "
            "(or --batch-size, --fit-samples, --eval-samples)",
        ) from exc


def _matrix(
    ctx: CommandContext,
    paths: dict[str, Path],
    plan: AttackPlan,
    players: list[Player],
    specs: tuple[Any, Any],
    fit_samples: int,
    eval_samples: int | None,
    batch_size: int,
) -> CommandOutput:
    from odekit.methods.attacks import PerSampleAttack, UniversalAttack, with_solver
    from odekit.methods.attacks.experiments import matrix_experiment

    if len(plan.budgets) != 1:
        raise UsageError("--matrix takes one budget", f"give a single --{plan.attack.budget_name} value")
    _same_inputs(players)
    attack = plan.attack
    assert isinstance(attack, UniversalAttack | PerSampleAttack)
    run = matrix_experiment(
        attack,
        plan.budgets[0],
        [(p.label, with_solver(p.model, specs[0], "--attack-solver")) for p in players],
        [(p.label, with_solver(p.model, specs[1], "--eval-solver")) for p in players],
        players[0].data,
        _scoring(ctx, batch_size, ctx.seed),
        fit_samples=fit_samples,
        eval_samples=eval_samples,
    )
    results = run.results
    results["figure_path"] = str(paths["matrix.png"])
    _save(ctx, paths, run, None, plan)
    names = results["matrix"]["targets"]
    rows = [
        [f"{n} (source)", *[f"{100 * v:.1f}%" for v in row]]
        for n, row in zip(results["matrix"]["sources"], results["matrix"]["fooling_rate"], strict=True)
    ]
    headline = [
        f"{plan.method}: transfer fooling-rate matrix over {results['test_samples']} test samples "
        "(rows: source, columns: target)"
    ]
    return CommandOutput(
        results, [ResultTable("Fooling rate (source x target)", ["", *names], rows)], headline
    )


def attack_command(
    checkpoints: Annotated[
        list[Path],
        typer.Argument(
            help="Target checkpoint (several with --matrix: each is both source and target).",
            show_default=False,
            metavar="CHECKPOINT",
        ),
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method", "-m", help=f"One of: {', '.join(names(ATTACK_HELP))}.", rich_help_panel=ATTACK
        ),
    ] = "active-subspace",
    norm: Annotated[
        str,
        typer.Option(
            "--norm",
            help="2 | inf (ignored by adef, which uses the T-norm).",
            rich_help_panel=ATTACK,
        ),
    ] = "2",
    delta: Annotated[
        str | None,
        typer.Option(
            "--delta",
            help="Universal budget(s): the l2 or linf norm ||v|| (per --norm) measured in [0, 1]-pixel units, "
            "whatever the model's normalisation; comma-separated for a sweep (one report, a row per budget) "
            "[default: 3.0 for l2, 0.15 for linf].",
            show_default=False,
            rich_help_panel=UNIVERSAL,
        ),
    ] = None,
    target: Annotated[
        int | None,
        typer.Option(
            "--target",
            help="Universal: targeted attack, push inputs to this class (success = predicted as it).",
            show_default=False,
            rich_help_panel=UNIVERSAL,
        ),
    ] = None,
    s0: Annotated[
        float | None,
        typer.Option(
            "--s0",
            help="Active subspace: first step length [default: 2*delta].",
            show_default=False,
            rich_help_panel=UNIVERSAL,
        ),
    ] = None,
    gamma: Annotated[
        float,
        typer.Option(
            "--gamma",
            help="Active subspace: backtracking decrease ratio.",
            rich_help_panel=UNIVERSAL,
        ),
    ] = 0.5,
    backtrack: Annotated[
        int,
        typer.Option(
            "--backtrack",
            help="Active subspace: step lengths tried per iteration.",
            rich_help_panel=UNIVERSAL,
        ),
    ] = 10,
    alpha: Annotated[
        int,
        typer.Option(
            "--alpha",
            help="Active subspace: stop after more than alpha failures.",
            rich_help_panel=UNIVERSAL,
        ),
    ] = 10,
    max_iter: Annotated[
        int,
        typer.Option(
            "--max-iters", help="Active subspace: iteration limit.", rich_help_panel=UNIVERSAL
        ),
    ] = 100,
    sweep_refine: Annotated[
        int,
        typer.Option(
            "--sweep-refine",
            help="Active subspace sweeps: warm-started iterations per budget below the largest "
            "(0: scale the largest budget's vector only).",
            rich_help_panel=UNIVERSAL,
        ),
    ] = 3,
    k: Annotated[
        int,
        typer.Option(
            "--k", help="as-k: dimension of the active subspace searched.", rich_help_panel=UNIVERSAL
        ),
    ] = 16,
    subspace_steps: Annotated[
        int,
        typer.Option(
            "--subspace-steps",
            help="as-k: projected gradient steps in the subspace.",
            rich_help_panel=UNIVERSAL,
        ),
    ] = 20,
    fit_samples: Annotated[
        int,
        typer.Option(
            "--fit-samples",
            min=1,
            help="Training samples the universal vector is fitted on.",
            rich_help_panel=UNIVERSAL,
        ),
    ] = 200,
    max_passes: Annotated[
        int,
        typer.Option(
            "--max-passes", help="UAP: passes over the fitting samples.", rich_help_panel=UNIVERSAL
        ),
    ] = 10,
    target_fooling: Annotated[
        float,
        typer.Option(
            "--target-fooling",
            help="UAP: stop once this fit fooling rate is reached.",
            rich_help_panel=UNIVERSAL,
        ),
    ] = 0.8,
    eps: Annotated[
        str | None,
        typer.Option(
            "--eps",
            help="Per-sample budget(s), comma-separated, fractions allowed [default: 8/255 linf, 0.5 l2, 1 pixel adef].",
            show_default=False,
            rich_help_panel=PER_SAMPLE,
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            "--iters",
            help="PGD/DeepFool/ADef iterations [default: 40 linf PGD, 50 l2 PGD, 50].",
            show_default=False,
            rich_help_panel=PER_SAMPLE,
        ),
    ] = None,
    restarts: Annotated[
        int,
        typer.Option(
            "--restarts",
            help="PGD restarts (a sample is broken if any restart breaks it).",
            rich_help_panel=PER_SAMPLE,
        ),
    ] = 1,
    random_start: Annotated[
        bool,
        typer.Option(
            "--random-start/--no-random-start",
            help="PGD random start in the eps ball.",
            rich_help_panel=PER_SAMPLE,
        ),
    ] = True,
    backend: Annotated[
        str,
        typer.Option(
            "--backend",
            help="fgsm/pgd/deepfool implementation: foolbox | torch.",
            rich_help_panel=PER_SAMPLE,
        ),
    ] = "foolbox",
    sigma: Annotated[
        float,
        typer.Option(
            "--sigma",
            help="ADef: Gaussian smoothing of the vector field, pixels.",
            rich_help_panel=PER_SAMPLE,
        ),
    ] = 1.0,
    units: Annotated[
        str,
        typer.Option(
            "--units",
            help="Units of --delta/--eps: pixel ([0, 1] pixels) or model (model-input units, "
            "i.e. pixels divided by the normalisation std, as in the thesis).",
            rich_help_panel=ATTACK,
        ),
    ] = "pixel",
    seeds: Annotated[
        str | None,
        typer.Option(
            "--seeds",
            help="Repeat the run for each seed (comma-separated; fit/eval samples and attack "
            "randomness) and report mean and spread [default: --seed once].",
            show_default=False,
            rich_help_panel=ATTACK,
        ),
    ] = None,
    eval_samples: Annotated[
        int | None,
        typer.Option(
            "--eval-samples",
            min=1,
            help="Held-out samples to evaluate on [default: the whole test split].",
            show_default=False,
            rich_help_panel=ATTACK,
        ),
    ] = None,
    source: Annotated[
        Path | None,
        typer.Option(
            "--source",
            help="Generate the attack on this model, evaluate on the target (black-box transfer).",
            rich_help_panel=TRANSFER,
        ),
    ] = None,
    attack_solver: Annotated[
        str | None,
        typer.Option(
            "--attack-solver",
            help="ODE models: solver spec used to generate the attack (grey-box).",
            rich_help_panel=TRANSFER,
        ),
    ] = None,
    eval_solver: Annotated[
        str | None,
        typer.Option(
            "--eval-solver",
            help="ODE models: solver spec used to evaluate it.",
            rich_help_panel=TRANSFER,
        ),
    ] = None,
    matrix: Annotated[
        bool,
        typer.Option(
            "--matrix",
            help="Source x target fooling-rate matrix over all given checkpoints.",
            rich_help_panel=TRANSFER,
        ),
    ] = False,
    batch_size: BatchSizeOpt = 256,
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
    from odekit.methods.attacks import parse_solver_spec
    from odekit.methods.attacks.plan import build_plan, parse_budgets, parse_seeds
    from odekit.methods.attacks.space import BUDGET_UNITS, budget_scale

    common = CommonOptions(
        device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads
    )
    params: dict[str, Any] = {
        "method": method,
        "norm": norm,
        "delta": delta,
        "eps": eps,
        "target": target,
        "s0": s0,
        "gamma": gamma,
        "backtrack": backtrack,
        "alpha": alpha,
        "max_iter": max_iter,
        "sweep_refine": sweep_refine,
        "k": k,
        "subspace_steps": subspace_steps,
        "fit_samples": fit_samples,
        "max_passes": max_passes,
        "target_fooling": target_fooling,
        "steps": steps,
        "restarts": restarts,
        "random_start": random_start,
        "backend": backend,
        "sigma": sigma,
        "eval_samples": eval_samples,
        "attack_solver": attack_solver,
        "eval_solver": eval_solver,
        "matrix": matrix,
        "units": units,
        "seeds": seeds,
        "batch_size": batch_size,
        "seed": seed,
    }
    model_opts = {"arch": arch, "num_classes": num_classes, "trust_checkpoint": trust_checkpoint, "arch_args": arch_args}

    def body(ctx: CommandContext) -> CommandOutput:
        prep = Preprocessing.from_options(normalize, input_shape, layout, pixel_max)
        unit = units.strip().lower()
        if unit not in BUDGET_UNITS:
            raise UsageError(f"unknown budget units '{units}'", f"choose one of: {', '.join(BUDGET_UNITS)}")
        if unit == "model" and delta is None and eps is None:
            raise UsageError("--units model needs an explicit budget", "give --delta (universal) or --eps (per-sample)")
        # settings are built from these by field name (odekit.methods.attacks.plan)
        options = {
            **{key: params[key] for key in ("norm", "target", "s0", "gamma", "backtrack", "alpha",
                                            "max_iter", "sweep_refine", "k", "subspace_steps", "max_passes",
                                            "target_fooling", "steps", "restarts", "random_start",
                                            "backend", "sigma")},
            "delta": parse_budgets(delta, "--delta") if delta is not None else None,
            "eps": parse_budgets(eps, "--eps") if eps is not None else None,
        }  # fmt: skip
        base_plan = build_plan(method, options)  # validates options before loading
        _drop_unused_params(ctx.params, base_plan, options)
        seed_list = parse_seeds(seeds) if seeds is not None else [ctx.seed]
        budget_option = f"--{base_plan.attack.budget_name}"

        def resolve(players: list[Player]) -> AttackPlan:
            """The plan with budgets in pixels, once the models' normalisation is known."""
            final = base_plan
            if unit == "model":
                final = build_plan(method, options, budget_scale([p.data for p in players]))
            for p in players:
                final.attack.distance.check_budgets(final.budgets, p.data.input_shape, budget_option)
                if target is not None and target >= p.data.num_classes:
                    raise UsageError(f"--target {target} is not a class of '{p.path}' "
                                     f"({p.data.num_classes} classes)",
                                     f"give a class in [0, {p.data.num_classes - 1}]")  # fmt: skip
            ctx.params["resolved"] = {
                "method": final.method,
                "budgets": final.budgets,
                "budget_units": unit,
                **asdict(final.attack.settings),
            }
            return final

        specs = (
            parse_solver_spec(attack_solver) if attack_solver else None,
            parse_solver_spec(eval_solver) if eval_solver else None,
        )
        sweep = len(base_plan.budgets) > 1
        if matrix:
            names = ["matrix.png"]
        elif base_plan.universal:
            names = ["perturbation.safetensors", "attack.png"]
            names += ["curve.csv", "fooling_rate.png"] if sweep else []
        else:
            names = ["perturbations.safetensors", "attack.png", "robust_accuracy.png"]
            names += ["curve.csv"] if sweep else []
        paths = {name: ctx.path(name) for name in names}  # claimed before any heavy work
        if matrix:
            if len(checkpoints) < 2:
                raise UsageError(
                    "--matrix needs at least two checkpoints", "odekit attack --matrix A B C ..."
                )
            if source is not None or seeds is not None:
                raise UsageError(
                    f"--matrix and {'--source' if source is not None else '--seeds'} do not combine",
                    "--matrix already uses every model as a source; it runs with --seed",
                )
            players = [
                _load_player(
                    ctx,
                    p,
                    "checkpoint" if i == 0 else f"checkpoint_{i + 1}",
                    model_opts,
                    data,
                    data_dir,
                    prep,
                )
                for i, p in enumerate(checkpoints)
            ]
            plan = resolve(players)
            with _solver_memory_guard(specs):
                output = _matrix(ctx, paths, plan, players, specs, fit_samples, eval_samples, batch_size)
        else:
            if len(checkpoints) != 1:
                raise UsageError(
                    f"got {len(checkpoints)} checkpoints",
                    "attack one model, or pass --matrix for a transfer matrix",
                )
            tgt = _load_player(ctx, checkpoints[0], "checkpoint", model_opts, data, data_dir, prep)
            src = _load_player(ctx, source, "source", model_opts, data, data_dir, prep) if source is not None else None
            if src is not None:
                _same_inputs([tgt, src])
            plan = resolve([tgt] if src is None else [tgt, src])
            roles = Roles(tgt, src, specs)
            with _solver_memory_guard(specs):
                if plan.universal:
                    output = _universal(ctx, paths, plan, roles, seed_list, fit_samples, eval_samples, batch_size)
                else:
                    output = _per_sample(ctx, paths, plan, roles, seed_list, eval_samples, batch_size)
        # delta/eps in results are always pixel units; record what the user typed and how.
        output.results["budget_units"] = unit
        if unit == "model":  # needs explicit budgets, so the unscaled plan holds them as typed
            given = base_plan.budgets
            output.results["budget_given"] = given[0] if base_plan.universal and not sweep else given
        return output

    run_command("attack", common, inputs={}, params=params, body=body, run_name=method,
                distributed=_splits_over_ranks(method, matrix))  # fmt: skip
