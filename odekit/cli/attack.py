"""`odekit attack`: universal perturbations, per-sample attacks, transfer and transfer matrices."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Annotated, Any

import typer
from torch import Tensor, nn

from odekit.cli.common import load_checkpoint, load_data
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
from odekit.io.datasets import Dataset
from odekit.io.preprocessing import Preprocessing
from odekit.methods.attacks import (
    ATTACKS,
    ActiveSubspaceSettings,
    ADefSettings,
    Attack,
    DeepFoolSettings,
    FGSMSettings,
    PerSampleAttack,
    PGDSettings,
    UAPSettings,
    UniversalAttack,
    UniversalSettings,
    parse_norm,
    parse_solver_spec,
    pixel_model,
    with_solver,
)
from odekit.methods.attacks.experiments import (
    AttackRun,
    Scoring,
    matrix_experiment,
    per_sample_experiment,
    universal_experiment,
)
from odekit.methods.attacks.space import BUDGET_UNITS, budget_scale
from odekit.writers.atomic import atomic_write_with
from odekit.writers.plots import save_figure

ATTACK = "Attack options"
UNIVERSAL = "Universal attack options"
PER_SAMPLE = "Per-sample attack options"
TRANSFER = "Transfer options"

DEFAULT_DELTA = {"2": 3.0, "inf": 0.15}
DEFAULT_EPS = {"2": [0.5], "inf": [8 / 255]}  # RobustBench budgets, pixel units
DEFAULT_ADEF_EPS = [1.0]  # pixels of displacement

EPILOG = f"""Examples:

  odekit attack checkpoints/lenet300_digits.safetensors --method active-subspace --delta 3 -o runs/as

  odekit attack checkpoints/lenet5_digits.safetensors --method uap --delta 3 --max-passes 10 --json

  odekit attack checkpoints/lenet5_digits.safetensors --method pgd --norm inf --eps 2/255,4/255,8/255 --restarts 2

  odekit attack checkpoints/lenet5_digits.safetensors --source checkpoints/lenet300_digits.safetensors --method fgsm

  odekit attack --matrix checkpoints/lenet300_digits.safetensors checkpoints/lenet5_digits.safetensors --method active-subspace

  odekit attack ode.safetensors --method pgd --attack-solver euler:2 --eval-solver rk4:8

Methods: {ATTACKS.help_text()}.

Budgets (--delta, --eps) are norms in [0, 1] pixel units, whatever normalisation the model uses
(RobustBench: linf 8/255, l2 0.5); reports give universal vector norms in pixel and in
model-input units. For adef, --eps is the largest displacement (T-norm) in pixels.
Solver specs: SOLVER[:STEPS[:U]], e.g. euler:2, rk2:8, rk2:4:1.0, rk4:4, dopri5.
--matrix rows are sources (generated on), columns targets (evaluated on).
"""


def parse_budgets(text: str, what: str = "--eps") -> list[float]:
    """'0.01,2/255,0.5' -> floats; every value must be positive."""
    values = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            value = float(Fraction(part)) if "/" in part else float(part)
        except (ValueError, ZeroDivisionError) as exc:
            raise UsageError(
                f"cannot read {what} value '{part}'",
                "give numbers like 0.5 or 8/255, comma-separated",
            ) from exc
        if not value > 0 or value == float("inf"):
            raise UsageError(
                f"{what} values must be positive and finite, got {part}",
                "budgets are norms in [0, 1] pixel units",
            )
        values.append(value)
    if not values:
        raise UsageError(f"{what} is empty", "give numbers like 0.5 or 8/255, comma-separated")
    return values


@dataclass(frozen=True)
class AttackPlan:
    """The parsed options: which attack, which budgets, which models play which role."""

    method: str
    norm: str
    budgets: list[float]
    attack: Attack

    @property
    def universal(self) -> bool:
        return isinstance(self.attack, UniversalAttack)

    @property
    def norm_label(self) -> str:
        return self.attack.norm_label if isinstance(self.attack, PerSampleAttack) else self.norm


def build_plan(
    method: str, norm: str, delta: float | None, eps: str | None, opts: dict[str, Any],
    scale: float = 1.0,
) -> AttackPlan:  # fmt: skip
    """`scale` converts given budgets to pixel units (model-unit budgets times the std)."""
    cls = ATTACKS.get(method)
    name = ATTACKS.entry(method).name
    norm = parse_norm(norm)
    if delta is not None:
        delta = delta * scale
    if issubclass(cls, UniversalAttack):
        if eps is not None:
            raise UsageError(
                f"--eps is for per-sample attacks; {name} is universal",
                "give its budget with --delta",
            )
        budget = DEFAULT_DELTA[norm] if delta is None else delta
        if name == "active-subspace":
            settings: Any = ActiveSubspaceSettings(
                norm=norm,
                delta=budget,
                s0=opts["s0"],
                gamma=opts["gamma"],
                backtrack=opts["backtrack"],
                alpha=opts["alpha"],
                max_iter=opts["max_iter"],
            )
        elif name == "uap":
            settings = UAPSettings(
                norm=norm,
                delta=budget,
                max_passes=opts["max_passes"],
                target_fooling=opts["target_fooling"],
            )
        else:
            settings = UniversalSettings(norm=norm, delta=budget)
        return AttackPlan(name, norm, [budget], cls(settings))
    if delta is not None:
        raise UsageError(
            f"--delta is for universal attacks; {name} is per-sample",
            "give its budget(s) with --eps",
        )
    if name == "adef":
        if scale != 1.0:
            raise UsageError("adef budgets are displacements in pixels; --units model does not apply to them",
                             "drop --units model")  # fmt: skip
        budgets = DEFAULT_ADEF_EPS if eps is None else parse_budgets(eps)
        settings = ADefSettings(steps=opts["steps"] or 50, sigma=opts["sigma"])
        return AttackPlan(name, "T", budgets, cls(settings))
    budgets = DEFAULT_EPS[norm] if eps is None else [b * scale for b in parse_budgets(eps)]
    backend = opts["backend"]
    if name == "fgsm":
        settings = FGSMSettings(norm=norm, backend=backend)
    elif name == "pgd":
        settings = PGDSettings(
            norm=norm,
            backend=backend,
            steps=opts["steps"],
            random_start=opts["random_start"],
            restarts=opts["restarts"],
        )
    else:
        settings = DeepFoolSettings(norm=norm, backend=backend, steps=opts["steps"] or 50)
    return AttackPlan(name, norm, budgets, cls(settings))


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

    state = {k: v.detach().cpu().contiguous().float() for k, v in tensors.items()}
    meta = {"odekit_attack": json.dumps(metadata, sort_keys=True), "format": "pt"}
    atomic_write_with(path, lambda tmp: save_file(state, str(tmp), metadata=meta), force)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _mode(source: Player | None, specs: tuple[Any, Any]) -> str:
    if source is not None:
        return "black-box transfer"
    if specs != (None, None) and str(specs[0]) != str(specs[1]):
        return "grey-box (solver transfer)"
    return "white-box"


def _scoring(ctx: CommandContext, batch_size: int, source: Player | None = None,
             specs: tuple[Any, Any] = (None, None)) -> Scoring:  # fmt: skip
    return Scoring(
        seed=ctx.seed, batch_size=batch_size, device=ctx.device, progress=ctx.progress,
        transfer=source is not None or specs != (None, None), mode=_mode(source, specs),
    )  # fmt: skip


def _save(ctx: CommandContext, paths: dict[str, Path], run: AttackRun, tensors_name: str | None) -> None:
    if tensors_name is not None:
        _write_tensors(paths[tensors_name], run.tensors, run.metadata, ctx.force)
    for name, figure in run.figures.items():
        save_figure(figure, paths[name], ctx.force)


def _universal(
    ctx: CommandContext,
    paths: dict[str, Path],
    plan: AttackPlan,
    target: Player,
    source: Player | None,
    specs: tuple[Any, Any],
    fit_samples: int,
    eval_samples: int | None,
    batch_size: int,
) -> CommandOutput:
    vec_path, fig_path = paths["perturbation.safetensors"], paths["attack.png"]
    gen_player = source or target
    attack = plan.attack
    assert isinstance(attack, UniversalAttack)
    run = universal_experiment(
        attack,
        with_solver(gen_player.model, specs[0], "--attack-solver"),
        with_solver(target.model, specs[1], "--eval-solver"),
        gen_player.data,
        target.data,
        _scoring(ctx, batch_size, source, specs),
        fit_samples=fit_samples,
        eval_samples=eval_samples,
        provenance={
            "model_sha256": gen_player.sha256,
            "model_path": str(gen_player.path),
            "target_sha256": target.sha256,
        },
    )
    results = run.results
    results["perturbation_path"], results["figure_path"] = str(vec_path), str(fig_path)
    _save(ctx, paths, run, "perturbation.safetensors")
    rows = [
        [
            "fooling rate (fit / test)",
            f"{_fmt(results['fooling_rate_fit'])} / {_fmt(results['fooling_rate_test'])}",
        ],
        [
            "accuracy (clean -> attacked)",
            f"{_fmt(results['clean_accuracy'])} -> {_fmt(results['robust_accuracy'])}",
        ],
        [
            f"||v||_{plan.norm} (pixel / model units)",
            f"{_fmt(results['norm_pixel'])} / {_fmt(results['norm_model'])}",
        ],
        ["seconds", _fmt(results["seconds"])],
        ["perturbation", str(vec_path)],
    ]
    headline = [
        f"{plan.method}: test fooling rate {100 * results['fooling_rate_test']:.1f}% at ||v||_{plan.norm} = "
        f"{results['norm_pixel']:.4g} (pixels), {results['seconds']:.2f} s"
    ]
    return CommandOutput(
        results, [ResultTable("Universal attack", ["quantity", "value"], rows)], headline
    )


def _per_sample(
    ctx: CommandContext,
    paths: dict[str, Path],
    plan: AttackPlan,
    target: Player,
    source: Player | None,
    specs: tuple[Any, Any],
    eval_samples: int | None,
    batch_size: int,
) -> CommandOutput:
    gen_player = source or target
    attack = plan.attack
    assert isinstance(attack, PerSampleAttack)
    run = per_sample_experiment(
        attack,
        plan.budgets,
        with_solver(gen_player.model, specs[0], "--attack-solver"),
        with_solver(target.model, specs[1], "--eval-solver"),
        target.data,
        _scoring(ctx, batch_size, source, specs),
        eval_samples=eval_samples,
        provenance={"model_sha256": gen_player.sha256, "target_sha256": target.sha256},
    )
    results = run.results
    results["perturbation_path"] = str(paths["perturbations.safetensors"])
    results["figure_path"] = str(paths["attack.png"])
    results["curve_path"] = str(paths["robust_accuracy.png"])
    _save(ctx, paths, run, "perturbations.safetensors")
    curve = results["curve"]
    rows = [
        [
            _fmt(p["eps"]),
            _fmt(p["robust_accuracy"]),
            _fmt(p["fooling_rate"]),
            _fmt(p["mean_size"]),
            _fmt(p["seconds"]),
        ]
        for p in curve
    ]
    headers = ["eps", "robust accuracy", "fooling rate", "mean size", "seconds"]
    headline = [
        f"{plan.method}: clean accuracy {100 * results['clean_accuracy']:.1f}%, robust accuracy "
        + ", ".join(f"{100 * p['robust_accuracy']:.1f}% @ {p['eps']:.4g}" for p in curve)
    ]
    return CommandOutput(results, [ResultTable("Robust accuracy", headers, rows)], headline)


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
    if len(plan.budgets) != 1:
        raise UsageError("--matrix takes one budget", "give a single --eps value")
    _same_inputs(players)
    attack = plan.attack
    assert isinstance(attack, UniversalAttack | PerSampleAttack)
    run = matrix_experiment(
        attack,
        plan.budgets[0],
        [(p.label, with_solver(p.model, specs[0], "--attack-solver")) for p in players],
        [(p.label, with_solver(p.model, specs[1], "--eval-solver")) for p in players],
        players[0].data,
        _scoring(ctx, batch_size),
        fit_samples=fit_samples,
        eval_samples=eval_samples,
    )
    results = run.results
    results["figure_path"] = str(paths["matrix.png"])
    _save(ctx, paths, run, None)
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
        ),
    ],
    method: Annotated[
        str,
        typer.Option(
            "--method", "-m", help=f"One of: {', '.join(ATTACKS.names())}.", rich_help_panel=ATTACK
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
        float | None,
        typer.Option(
            "--delta",
            help="Universal budget ||v|| in [0,1] pixel units [default: 3.0 for l2, 0.15 for linf].",
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
            "--max-iter", help="Active subspace: iteration limit.", rich_help_panel=UNIVERSAL
        ),
    ] = 100,
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
            "--steps",
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
    common = CommonOptions(
        device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads
    )
    params: dict[str, Any] = {
        "method": method,
        "norm": norm,
        "delta": delta,
        "eps": eps,
        "s0": s0,
        "gamma": gamma,
        "backtrack": backtrack,
        "alpha": alpha,
        "max_iter": max_iter,
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
        base_plan = build_plan(method, norm, delta, eps, params)  # validates options before loading

        def resolve(players: list[Player]) -> AttackPlan:
            """The plan with budgets in pixels, once the models' normalisation is known."""
            final = base_plan
            if unit == "model":
                final = build_plan(method, norm, delta, eps, params, budget_scale([p.data for p in players]))
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
        if matrix:
            names = ["matrix.png"]
        elif base_plan.universal:
            names = ["perturbation.safetensors", "attack.png"]
        else:
            names = ["perturbations.safetensors", "attack.png", "robust_accuracy.png"]
        paths = {name: ctx.path(name) for name in names}  # claimed before any heavy work
        if matrix:
            if len(checkpoints) < 2:
                raise UsageError(
                    "--matrix needs at least two checkpoints", "odekit attack --matrix A B C ..."
                )
            if source is not None:
                raise UsageError(
                    "--matrix and --source do not combine",
                    "--matrix already uses every model as a source",
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
            output = _matrix(ctx, paths, resolve(players), players, specs, fit_samples, eval_samples, batch_size)
        else:
            if len(checkpoints) != 1:
                raise UsageError(
                    f"got {len(checkpoints)} checkpoints",
                    "attack one model, or pass --matrix for a transfer matrix",
                )
            target = _load_player(ctx, checkpoints[0], "checkpoint", model_opts, data, data_dir, prep)
            src = _load_player(ctx, source, "source", model_opts, data, data_dir, prep) if source is not None else None
            if src is not None:
                _same_inputs([target, src])
            plan = resolve([target] if src is None else [target, src])
            if plan.universal:
                output = _universal(ctx, paths, plan, target, src, specs, fit_samples, eval_samples, batch_size)
            else:
                output = _per_sample(ctx, paths, plan, target, src, specs, eval_samples, batch_size)
        # delta/eps in results are always pixel units; record what the user typed and how.
        output.results["budget_units"] = unit
        if unit == "model":  # needs explicit budgets, so the unscaled plan holds them as typed
            given = base_plan.budgets
            output.results["budget_given"] = given[0] if base_plan.universal else given
        return output

    run_command("attack", common, inputs={}, params=params, body=body, run_name=method)
