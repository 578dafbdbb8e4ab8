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
    ArchOpt,
    BatchSizeOpt,
    CommonOptions,
    DataDirOpt,
    DataOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    JsonOpt,
    ModelOptions,
    NumClassesOpt,
    OutOpt,
    SeedOpt,
    TrustOpt,
)
from odekit.cli.runner import CommandContext, CommandOutput, ResultTable, run_command
from odekit.errors import DataError, UsageError
from odekit.io.datasets import Dataset
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
    apply_perturbation,
    check_differentiable,
    evaluate_adversarial,
    evaluate_universal,
    fooling_rate,
    lp_norm,
    parse_norm,
    parse_solver_spec,
    pixel_model,
    predict_on,
    to_model_units,
    to_pixels,
    transfer_matrix,
    with_solver,
)
from odekit.methods.attacks.figures import curve_figure, examples_figure, matrix_figure
from odekit.writers.atomic import atomic_write_with
from odekit.writers.plots import save_figure

ATTACK = "Attack options"
UNIVERSAL = "Universal attack options"
PER_SAMPLE = "Per-sample attack options"
TRANSFER = "Transfer options"

DEFAULT_DELTA = {"2": 3.0, "inf": 0.15}
DEFAULT_EPS = {"2": [0.5], "inf": [8 / 255]}  # RobustBench budgets, pixel units
DEFAULT_ADEF_EPS = [1.0]  # pixels of displacement
N_EXAMPLES = 6

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
    method: str, norm: str, delta: float | None, eps: str | None, opts: dict[str, Any]
) -> AttackPlan:
    cls = ATTACKS.get(method)
    name = ATTACKS.entry(method).name
    norm = parse_norm(norm)
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
        budgets = DEFAULT_ADEF_EPS if eps is None else parse_budgets(eps)
        settings = ADefSettings(steps=opts["steps"] or 50, sigma=opts["sigma"])
        return AttackPlan(name, "T", budgets, cls(settings))
    budgets = DEFAULT_EPS[norm] if eps is None else parse_budgets(eps)
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
) -> Player:
    loaded = load_checkpoint(ctx, ModelOptions(checkpoint=path, **model_opts), key=key)
    data_key = "data" if key == "checkpoint" else f"{key}_data"
    dataset = load_data(ctx, loaded, data, data_dir, key=data_key)
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
    attack_model = with_solver(gen_player.model, specs[0], "--attack-solver")
    eval_model = with_solver(target.model, specs[1], "--eval-solver")
    x_fit = to_pixels(
        gen_player.data.train.subset(fit_samples, seed=ctx.seed).x,
        gen_player.data,
        "the fitting data",
    )
    test = target.data.test.subset(eval_samples, seed=ctx.seed)
    x_test, y_test = (
        to_pixels(test.x, target.data, "the test data").to(ctx.device),
        test.y.to(ctx.device),
    )
    check_differentiable(attack_model, x_fit[:2].to(ctx.device))
    attack = plan.attack
    assert isinstance(attack, UniversalAttack)
    result = attack(
        attack_model, x_fit, seed=ctx.seed, batch_size=batch_size, progress=ctx.progress
    )
    v = result.v
    x_fit_dev = x_fit.to(ctx.device)
    fit_rate = fooling_rate(
        eval_model, x_fit_dev, v, predict_on(eval_model, x_fit_dev, batch_size), batch_size
    )
    test_eval = evaluate_universal(eval_model, x_test, y_test, v, batch_size)
    v_model = to_model_units(v, target.data)
    effective = (apply_perturbation(x_test, v) - x_test).flatten(1)
    eff_norm = effective.norm(dim=1) if plan.norm == "2" else effective.abs().amax(dim=1)
    results: dict[str, Any] = {
        "method": plan.method,
        "norm": plan.norm,
        "delta": plan.budgets[0],
        "clean_accuracy": test_eval["clean_accuracy"],
        "robust_accuracy": test_eval["robust_accuracy"],
        "fooling_rate_fit": fit_rate,
        "fooling_rate_test": test_eval["fooling_rate"],
        "seconds": result.seconds,
        "perturbation_path": str(vec_path),
        "figure_path": str(fig_path),
        "norm_pixel": lp_norm(v, plan.norm),
        "norm_model": lp_norm(v_model, plan.norm),
        "mean_effective_norm_pixel": float(eff_norm.mean()),
        "fit_samples": len(x_fit),
        "test_samples": len(x_test),
        "iterations": result.iterations,
        "history_fit": result.history,
        "mode": _mode(source, specs),
        **result.extra,
    }
    if source is not None or specs != (None, None):
        results["source_fooling_rate_fit"] = result.fooling_rate_fit
        results["source_fooling_rate_test"] = evaluate_universal(
            attack_model, x_test, y_test, v, batch_size
        )["fooling_rate"]
    metadata = {
        "method": plan.method,
        "norm": plan.norm,
        "delta": plan.budgets[0],
        "units": "perturbation: model-input units; perturbation_pixel: [0,1] pixels",
        "norm_pixel": results["norm_pixel"],
        "norm_model": results["norm_model"],
        "model_sha256": gen_player.sha256,
        "model_path": str(gen_player.path),
        "target_sha256": target.sha256,
        "data": target.data.describe(),
        "fooling_rate_test": results["fooling_rate_test"],
        "seed": ctx.seed,
    }
    _write_tensors(
        vec_path, {"perturbation": v_model, "perturbation_pixel": v}, metadata, ctx.force
    )
    k = min(N_EXAMPLES, len(x_test))
    x_ex = x_test[:k]
    x_adv = apply_perturbation(x_ex, v)
    before, after = predict_on(eval_model, x_ex).tolist(), predict_on(eval_model, x_adv).tolist()
    title = (
        f"{plan.method} (l{plan.norm}, delta={plan.budgets[0]:g} px): test fooling rate "
        f"{100 * results['fooling_rate_test']:.1f}%"
    )
    save_figure(
        examples_figure(x_ex, x_adv, before, after, title, vector=v, vector_title="v (pixels)"),
        fig_path,
        ctx.force,
    )
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
        ["seconds", _fmt(result.seconds)],
        ["perturbation", str(vec_path)],
    ]
    headline = [
        f"{plan.method}: test fooling rate {100 * results['fooling_rate_test']:.1f}% at ||v||_{plan.norm} = "
        f"{results['norm_pixel']:.4g} (pixels), {result.seconds:.2f} s"
    ]
    return CommandOutput(
        results, [ResultTable("Universal attack", ["quantity", "value"], rows)], headline
    )


def _mode(source: Player | None, specs: tuple[Any, Any]) -> str:
    if source is not None:
        return "black-box transfer"
    if specs != (None, None) and str(specs[0]) != str(specs[1]):
        return "grey-box (solver transfer)"
    return "white-box"


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
    pert_path, fig_path, curve_path = (
        paths["perturbations.safetensors"],
        paths["attack.png"],
        paths["robust_accuracy.png"],
    )
    gen_player = source or target
    attack_model = with_solver(gen_player.model, specs[0], "--attack-solver")
    eval_model = with_solver(target.model, specs[1], "--eval-solver")
    test = target.data.test.subset(eval_samples, seed=ctx.seed)
    x, y = to_pixels(test.x, target.data, "the test data").to(ctx.device), test.y.to(ctx.device)
    check_differentiable(attack_model, x[:2])
    attack = plan.attack
    assert isinstance(attack, PerSampleAttack)
    curve, tensors = [], {}
    seconds = 0.0
    clean_acc = evaluate_adversarial(eval_model, x, y, x, batch_size)["clean_accuracy"]
    last_adv = x
    for i, eps in enumerate(plan.budgets):
        res = attack(
            attack_model, x, y, eps, seed=ctx.seed + i, batch_size=batch_size, progress=ctx.progress
        )
        seconds += res.seconds
        scores = evaluate_adversarial(eval_model, x, y, res.x_adv, batch_size)
        point = {
            "eps": eps,
            "robust_accuracy": scores["robust_accuracy"],
            "fooling_rate": scores["fooling_rate"],
            "seconds": res.seconds,
            "max_size": float(res.sizes.max()),
            "mean_size": float(res.sizes.mean()),
        }
        if source is not None or specs != (None, None):
            point["source_robust_accuracy"] = evaluate_adversarial(
                attack_model, x, y, res.x_adv, batch_size
            )["robust_accuracy"]
        curve.append(point)
        tensors[f"eps_{i}"] = res.x_adv - x
        last_adv = res.x_adv
    unit = "pixels of displacement (T-norm)" if plan.method == "adef" else "[0,1] pixel units"
    results: dict[str, Any] = {
        "method": plan.method,
        "norm": plan.norm_label,
        "eps": plan.budgets,
        "eps_units": unit,
        "backend": getattr(attack.settings, "backend", "torch"),
        "clean_accuracy": clean_acc,
        "robust_accuracy": [p["robust_accuracy"] for p in curve],
        "fooling_rate_fit": None,
        "fooling_rate_test": [p["fooling_rate"] for p in curve],
        "seconds": seconds,
        "perturbation_path": str(pert_path),
        "figure_path": str(fig_path),
        "curve_path": str(curve_path),
        "test_samples": len(x),
        "curve": curve,
        "mode": _mode(source, specs),
    }
    metadata = {
        "method": plan.method,
        "norm": plan.norm_label,
        "eps": plan.budgets,
        "units": f"pixel-space x_adv - x; eps in {unit}",
        "model_sha256": gen_player.sha256,
        "target_sha256": target.sha256,
        "data": target.data.describe(),
        "test_indices_seed": ctx.seed,
    }
    _write_tensors(pert_path, tensors, metadata, ctx.force)
    k = min(N_EXAMPLES, len(x))
    before, after = (
        predict_on(eval_model, x[:k]).tolist(),
        predict_on(eval_model, last_adv[:k]).tolist(),
    )
    title = f"{plan.method} ({plan.norm_label}, eps={plan.budgets[-1]:.4g}): robust accuracy {100 * curve[-1]['robust_accuracy']:.1f}%"
    save_figure(examples_figure(x[:k], last_adv[:k], before, after, title), fig_path, ctx.force)
    xlabel = (
        "eps (T-norm, pixels)"
        if plan.method == "adef"
        else f"eps (l{plan.norm}, [0,1] pixel units)"
    )
    save_figure(
        curve_figure(
            plan.budgets,
            results["robust_accuracy"],
            clean_acc,
            f"{plan.method}: robust accuracy",
            xlabel,
        ),
        curve_path,
        ctx.force,
    )
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
        f"{plan.method}: clean accuracy {100 * clean_acc:.1f}%, robust accuracy "
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
    fig_path = paths["matrix.png"]
    if len(plan.budgets) != 1:
        raise UsageError("--matrix takes one budget", "give a single --eps value")
    _same_inputs(players)
    base = players[0]
    test = base.data.test.subset(eval_samples, seed=ctx.seed)
    x, y = to_pixels(test.x, base.data, "the test data").to(ctx.device), test.y.to(ctx.device)
    x_fit = to_pixels(
        base.data.train.subset(fit_samples, seed=ctx.seed).x, base.data, "the fitting data"
    )
    sources = [(p.label, with_solver(p.model, specs[0], "--attack-solver")) for p in players]
    targets = {p.label: with_solver(p.model, specs[1], "--eval-solver") for p in players}
    for _, model in sources:
        check_differentiable(model, x[:2])
    attack = plan.attack
    seconds: list[float] = []

    def generate(source: nn.Module) -> Tensor:
        if isinstance(attack, UniversalAttack):
            res = attack(source, x_fit, seed=ctx.seed, batch_size=batch_size, progress=ctx.progress)
            seconds.append(res.seconds)
            return apply_perturbation(x, res.v)
        assert isinstance(attack, PerSampleAttack)
        res_ps = attack(
            source,
            x,
            y,
            plan.budgets[0],
            seed=ctx.seed,
            batch_size=batch_size,
            progress=ctx.progress,
        )
        seconds.append(res_ps.seconds)
        return res_ps.x_adv

    table = transfer_matrix(
        sources, [(p.label, targets[p.label]) for p in players], generate, x, y, batch_size
    )
    fool, robust = table.fooling_rate, table.robust_accuracy
    names = [p.label for p in players]
    clean = [evaluate_adversarial(targets[n], x, y, x, batch_size)["clean_accuracy"] for n in names]
    budget_key = "delta" if plan.universal else "eps"
    results: dict[str, Any] = {
        "method": plan.method,
        "norm": plan.norm_label,
        budget_key: plan.budgets[0],
        "matrix": {
            "sources": names,
            "targets": names,
            "fooling_rate": fool,
            "robust_accuracy": robust,
            "orientation": "rows are sources (generated on), columns are targets (evaluated on)",
        },
        "clean_accuracy": dict(zip(names, clean, strict=True)),
        "seconds": sum(seconds),
        "seconds_per_source": seconds,
        "test_samples": len(x),
        "figure_path": str(fig_path),
    }
    title = f"{plan.method} ({plan.norm_label}, {budget_key}={plan.budgets[0]:.4g}): fooling rate, source x target"
    save_figure(matrix_figure(names, fool, title), fig_path, ctx.force)
    rows = [
        [f"{n} (source)", *[f"{100 * v:.1f}%" for v in row]]
        for n, row in zip(names, fool, strict=True)
    ]
    headline = [
        f"{plan.method}: transfer fooling-rate matrix over {len(x)} test samples (rows: source, columns: target)"
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
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Attack a model: universal perturbations (active subspace, UAP, random), per-sample attacks
    (FGSM, PGD, DeepFool, ADef), black-box/grey-box transfer and transfer matrices."""
    common = CommonOptions(
        device=device, seed=seed, out=out, force=force, json=json_output, debug=debug
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
        "batch_size": batch_size,
        "seed": seed,
    }
    model_opts = {"arch": arch, "num_classes": num_classes, "trust_checkpoint": trust_checkpoint}

    def body(ctx: CommandContext) -> CommandOutput:
        plan = build_plan(method, norm, delta, eps, params)
        ctx.params["resolved"] = {
            "method": plan.method,
            "budgets": plan.budgets,
            **asdict(plan.attack.settings),
        }
        specs = (
            parse_solver_spec(attack_solver) if attack_solver else None,
            parse_solver_spec(eval_solver) if eval_solver else None,
        )
        if matrix:
            names = ["matrix.png"]
        elif plan.universal:
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
                )
                for i, p in enumerate(checkpoints)
            ]
            return _matrix(ctx, paths, plan, players, specs, fit_samples, eval_samples, batch_size)
        if len(checkpoints) != 1:
            raise UsageError(
                f"got {len(checkpoints)} checkpoints",
                "attack one model, or pass --matrix for a transfer matrix",
            )
        target = _load_player(ctx, checkpoints[0], "checkpoint", model_opts, data, data_dir)
        src = (
            _load_player(ctx, source, "source", model_opts, data, data_dir)
            if source is not None
            else None
        )
        if src is not None:
            _same_inputs([target, src])
        if plan.universal:
            return _universal(
                ctx, paths, plan, target, src, specs, fit_samples, eval_samples, batch_size
            )
        return _per_sample(ctx, paths, plan, target, src, specs, eval_samples, batch_size)

    run_command("attack", common, inputs={}, params=params, body=body, run_name=method)
