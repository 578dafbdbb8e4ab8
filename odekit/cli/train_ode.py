"""`odekit train-ode`: train an ODENet classifier or a CNF density model end to end."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from odekit.cli.names import (
    ACTIVATION_NAMES,
    GRADIENT_METHOD_NAMES,
    NORM_CHOICES,
    REGIME_HELP,
    SOLVER_NAMES,
    TOY_DATASET_NAMES,
    TRACE_MODE_NAMES,
    help_line,
    names,
)
from odekit.cli.options import (
    DATA,
    CommonOptions,
    DataDirOpt,
    DebugOpt,
    DeviceOpt,
    ForceOpt,
    InputShapeOpt,
    JsonOpt,
    LayoutOpt,
    NormalizeOpt,
    OutOpt,
    PixelMaxOpt,
    SeedOpt,
    ThreadsOpt,
)
from odekit.cli.runner import CommandContext, CommandOutput, ResultTable, run_command
from odekit.errors import UsageError
from odekit.io.preprocessing import Preprocessing

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch (issue 12)
    import torch

    from odekit.io.checkpoints import LoadedModel
    from odekit.io.toy2d import ToyData
    from odekit.methods.ode_train import ODETrainResult
    from odekit.models.ode_models import CNF
    from odekit.ode import SolverConfig

TASKS = ("classify", "density", "regress")
CLASSIFIER_ARCHS = ("odenet4", "odenet10")
SOLVER = "Solver options"
TRAIN = "Training options"
ARCH = "Model options"
REGIME = "Meta-solver options"
VARPRO = "VarPro options"

EPILOG = """Examples:

  odekit train-ode --data digits --solver euler --steps 2 --epochs 10 -o runs/euler2

  odekit train-ode --solver rk2 --steps 4 --solver-regime smoothing --u-mean 0.5 --u-std 0.0125

  odekit train-ode --solver rk2 --steps 4 --solver-regime switching --u-set 0.5,1.0

  odekit train-ode --task density --data pinwheel --solver dopri5 --grad irdm --iters 2000

  odekit train-ode --solver dopri5 --grad irdm --seminorm --adjoint-rtol 1e-2 --adjoint-atol 1e-2

  odekit train-ode --data cifar10 --data-dir ~/data --model odenet10 --norm-ode ln --augment --device cuda

  odekit train-ode --resume runs/euler2/model.safetensors --epochs 5 -o runs/euler2-more

  odekit train-ode --task regress --data cdr --optimizer gnvpro --iters 30 -o runs/cdr-gnvpro

  odekit train-ode --task regress --data cdr --optimizer gnvpro --compare adam,slimtrain --work-units 600

  odekit train-ode --model odenet_antisym --data digits --optimizer gnvpro --levels 2 --depth 4

Writes model.safetensors (its metadata records the training solver, so smoothness-check and
attack know it), curves.png (and density.png for 2-D toys), report.json and report.md.
VarPro (--task regress, --optimizer gnvpro|slimtrain, --model odenet_antisym, --compare,
--levels) writes convergence.png instead of curves.png: loss vs work units (a forward or a
backward pass over the training set = 1 unit; GNvpro adds 2r per outer iteration).
NFE = f evaluations per training iteration, summed over ODE blocks (forward / backward).
irdm interpolates z(t) with --cheb-nodes auto: report.json's interp_error (the worst estimate
of any solve) stays within interp_tol (the adjoint rtol); a fixed N that misses it says so once.
rdm/irdm backward tolerances default to the forward ones; a looser adjoint tolerance with
--seminorm reached the same target 1.4-4.3x faster in docs/train-ode.md (run C).
"""


def _floats(text: str | None, what: str) -> tuple[float, ...]:
    if text is None or not text.strip():
        return ()
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise UsageError(f"cannot read {what} '{text}'", "give comma-separated numbers, e.g. 0.5,1.0") from None


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = ()
    if not values or any(v < 1 for v in values):
        raise UsageError(f"cannot read {what} '{text}'", "give comma-separated positive integers, e.g. 64,64")
    return values


def _solver_config(
    solver: str, steps: int | None, u: float, rtol: float | None, atol: float | None, grad: str,
    cheb_nodes: int | str, checkpoints: int, t1: float, task: str, adjoint_rtol: float | None = None,
    adjoint_atol: float | None = None, seminorm: bool = False,
) -> SolverConfig:  # fmt: skip
    from odekit.ode import SOLVERS, SolverConfig

    spec = SOLVERS.get(solver)
    if spec.adaptive and steps is not None:
        raise UsageError(f"--steps does not apply to the adaptive solver '{spec.name}'", "set --rtol/--atol instead")
    if not spec.adaptive and (rtol is not None or atol is not None):
        raise UsageError(f"--rtol/--atol do not apply to the fixed-step solver '{spec.name}'", "set --steps instead")
    if adjoint_rtol is not None or adjoint_atol is not None or seminorm:
        flags = "--adjoint-rtol/--adjoint-atol/--seminorm"
        if not spec.adaptive:
            raise UsageError(f"{flags} apply to the adaptive solver dopri5, not '{spec.name}'", "drop them or use --solver dopri5")
        if grad.strip().lower() not in ("rdm", "irdm"):
            raise UsageError(f"{flags} apply to the backward solves of --grad rdm/irdm, not '{grad}'", "use --grad irdm or drop them")
    default_tol = 1e-5 if task == "density" else 1e-3
    return SolverConfig(
        solver=spec.name,
        steps=None if spec.adaptive else (steps if steps is not None else 4),
        u=u,
        rtol=rtol if rtol is not None else default_tol,
        atol=atol if atol is not None else default_tol,
        grad=grad,
        cheb_nodes=cheb_nodes,
        checkpoints=checkpoints,
        t1=t1,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        seminorm=seminorm,
    )


def _interpolation_warning_once(ctx: CommandContext, config: SolverConfig, caught: list[warnings.WarningMessage]) -> None:
    """irdm warns on every solve that misses its tolerance: say it once, on stderr; pass the rest on."""
    from odekit.ode import InterpolationWarning

    ours = [w.message for w in caught if isinstance(w.message, InterpolationWarning)]
    for w in caught:
        if not isinstance(w.message, InterpolationWarning):
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    if ours:
        worst = max(ours, key=lambda m: m.error)
        hint = ("use --cheb-nodes auto" if config.cheb_nodes != "auto"
                else "single forward steps are not resolved that finely: loosen --adjoint-rtol/--adjoint-atol or tighten --rtol/--atol")  # fmt: skip
        ctx.log_console.print(f"Warning: irdm's interpolant of z(t) (--cheb-nodes {config.cheb_nodes}) missed the adjoint tolerance "
                              f"{worst.tol:g} in {len(ours)} solves, estimated error up to {worst.error:.2g}; {hint}", highlight=False, soft_wrap=True)  # fmt: skip


def _arch_args(task: str, model: str, opts: dict[str, Any], in_channels: int, num_classes: int) -> dict[str, Any]:
    if task == "density":
        return {"dim": 2, "hidden": list(opts["hidden"]), "activation": opts["activation"] or "tanh", "trace": opts["trace"]}
    return {
        "num_classes": num_classes,
        "in_channels": in_channels,
        "width": opts["width"] if opts["width"] is not None else (32 if model == "odenet4" else 16),
        "norm_first": opts["norm_first"] or "bn",
        "norm_ode": opts["norm_ode"] or "ln",
        "activation": opts["activation"] or "relu",
        "stem_stride": opts["stem_stride"],
        "pool": opts["pool"],
    }


def _check_resume_compatible(loaded: LoadedModel, task: str, model: str | None, opts: dict[str, Any]) -> None:
    arch = loaded.meta.arch
    expected = ("cnf",) if task == "density" else CLASSIFIER_ARCHS
    if arch not in expected:
        raise UsageError(
            f"--resume checkpoint has architecture '{arch}', which --task {task} cannot continue",
            f"resume a {' or '.join(expected)} checkpoint written by train-ode",
        )
    if model is not None and model != arch:
        raise UsageError(f"--model {model} contradicts the resumed checkpoint ({arch})", "drop --model when resuming")
    for key, value in opts.items():
        if value is not None and key in loaded.meta.args and loaded.meta.args[key] != value:
            raise UsageError(
                f"--{key.replace('_', '-')} {value} contradicts the resumed checkpoint ({loaded.meta.args[key]})",
                "architecture options come from the checkpoint when resuming; drop them",
            )


def _plot_curves(path: Path, history: list[dict[str, float]], task: str, force: bool) -> None:
    from odekit.writers.plots import new_figure, save_figure

    fig, axes = new_figure(2, 1, (5.0, 3.6))
    x = [h["iteration"] for h in history]
    if task == "classify":
        axes[0][0].plot(x, [h["train_loss"] for h in history], "o-", label="train loss")
        axes[0][0].plot(x, [h["test_loss"] for h in history], "s-", label="test loss")
        axes[0][1].plot(x, [h["test_accuracy"] for h in history], "o-", color="tab:green")
        axes[0][1].set_ylabel("test accuracy")
    else:
        axes[0][0].plot(x[1:], [h["train_loss"] for h in history[1:]], "o-", label="train NLL (nats)")
        axes[0][0].plot(x, [h["test_nll"] for h in history], "s-", label="test NLL (nats)")
        axes[0][1].plot(x, [h["bits_per_dim"] for h in history], "o-", color="tab:green")
        axes[0][1].set_ylabel("test bits/dim")
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend()
    for ax in axes[0]:
        ax.set_xlabel("training iteration")
        ax.grid(alpha=0.3)
    save_figure(fig, path, force)


def _plot_density(path: Path, model: CNF, data: ToyData, device: torch.device, force: bool) -> None:
    import numpy as np

    from odekit.methods.ode_train import density_grid
    from odekit.writers.plots import new_figure, save_figure

    xs, ys, log_p = density_grid(model, data.test, device)
    fig, axes = new_figure(2, 1, (4.2, 4.0))
    pts = data.test[:2000].numpy()
    axes[0][0].scatter(pts[:, 0], pts[:, 1], s=2, alpha=0.5)
    axes[0][0].set_title(f"{data.name}: test samples")
    axes[0][1].pcolormesh(xs, ys, np.exp(log_p), shading="auto", cmap="magma")
    axes[0][1].set_title("learned density p(x)")
    for ax in axes[0]:
        ax.set_xlim(xs.min(), xs.max())
        ax.set_ylim(ys.min(), ys.max())
        ax.set_aspect("equal")
    save_figure(fig, path, force)


def train_ode_command(
    task: Annotated[str, typer.Option("--task", help="classify (ODENet on images) | density (CNF on a 2-D toy) | regress (least squares; --data cdr or .npz).")] = "classify",
    data: Annotated[
        str | None,
        typer.Option("--data", help=f"classify: digits | mnist | cifar10 | ... [digits]; density: {' | '.join(TOY_DATASET_NAMES)} [pinwheel].",
                     show_default=False, rich_help_panel=DATA),
    ] = None,
    data_dir: DataDirOpt = None,
    normalize: NormalizeOpt = None,
    input_shape: InputShapeOpt = None,
    layout: LayoutOpt = "auto",
    pixel_max: PixelMaxOpt = None,
    train_samples: Annotated[int, typer.Option("--train-samples", min=1, help="density: toy training points.", rich_help_panel=DATA)] = 10_000,
    test_samples: Annotated[int, typer.Option("--test-samples", min=1, help="density: toy test points.", rich_help_panel=DATA)] = 2_000,
    model: Annotated[str | None, typer.Option("--model", help="odenet4 | odenet10 | odenet_antisym (classify; regress: odenet_antisym); density always uses cnf [odenet4].", show_default=False, rich_help_panel=ARCH)] = None,
    width: Annotated[int | None, typer.Option("--width", min=1, help="ODENet channels [odenet4: 32, odenet10: 16].", show_default=False, rich_help_panel=ARCH)] = None,
    norm_first: Annotated[str | None, typer.Option("--norm-first", help=f"Norm after the first conv (and in ResNet blocks): {help_line(NORM_CHOICES)} [bn].", show_default=False, rich_help_panel=ARCH)] = None,
    norm_ode: Annotated[str | None, typer.Option("--norm-ode", help=f"Norm inside the ODE function: {' | '.join(names(NORM_CHOICES))} [ln].", show_default=False, rich_help_panel=ARCH)] = None,
    activation: Annotated[str | None, typer.Option("--activation", help=f"{' | '.join(ACTIVATION_NAMES)} [relu; cnf: tanh].", show_default=False, rich_help_panel=ARCH)] = None,
    pool: Annotated[int, typer.Option("--pool", min=1, help="Average-pool to PxP before fc (1 = the thesis' global pool; 2 keeps coarse layout, better on 8x8 digits).", rich_help_panel=ARCH)] = 2,
    stem_stride: Annotated[int, typer.Option("--stem-stride", min=1, help="Stride of the first conv (2 quarters the ODE cost on 28x28+ images).", rich_help_panel=ARCH)] = 1,
    hidden: Annotated[str, typer.Option("--hidden", help="CNF hidden widths (concatsquash layers).", rich_help_panel=ARCH)] = "64,64",
    trace: Annotated[str, typer.Option("--trace", help=f"CNF trace: {' | '.join(TRACE_MODE_NAMES)} (auto: exact up to 8 dims, Hutchinson above).", rich_help_panel=ARCH)] = "auto",
    solver: Annotated[str | None, typer.Option("--solver", help=f"{' | '.join(SOLVER_NAMES)} [classify: rk2; density: dopri5].", show_default=False, rich_help_panel=SOLVER)] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Steps over [0, t1] for fixed-step solvers [4].", show_default=False, rich_help_panel=SOLVER)] = None,
    u: Annotated[float, typer.Option("--u", help="RK2(u) parameter in (0, 1]: 0.5 midpoint, 1 Heun.", rich_help_panel=SOLVER)] = 0.5,
    rtol: Annotated[float | None, typer.Option("--rtol", help="dopri5 relative tolerance [classify 1e-3, density 1e-5].", show_default=False, rich_help_panel=SOLVER)] = None,
    atol: Annotated[float | None, typer.Option("--atol", help="dopri5 absolute tolerance [classify 1e-3, density 1e-5].", show_default=False, rich_help_panel=SOLVER)] = None,
    adjoint_rtol: Annotated[float | None, typer.Option("--adjoint-rtol", help="rdm/irdm: relative tolerance of the backward solves [--rtol].", show_default=False, rich_help_panel=SOLVER)] = None,
    adjoint_atol: Annotated[float | None, typer.Option("--adjoint-atol", help="rdm/irdm: absolute tolerance of the backward solves, relative to the gradient's RMS [--atol].", show_default=False, rich_help_panel=SOLVER)] = None,
    seminorm: Annotated[bool, typer.Option("--seminorm", help="rdm/irdm: leave dL/dtheta out of the backward step control (fewer steps).", rich_help_panel=SOLVER)] = False,
    grad: Annotated[str, typer.Option("--grad", help=f"Gradient method: {' | '.join(GRADIENT_METHOD_NAMES)}.", rich_help_panel=SOLVER)] = "backprop",
    cheb_nodes: Annotated[str, typer.Option("--cheb-nodes", help="irdm: auto (piecewise Chebyshev interpolant of the forward steps, error within the adjoint tolerance) or a fixed grid size N (N+1 points).", rich_help_panel=SOLVER)] = "auto",
    checkpoints: Annotated[int, typer.Option("--checkpoints", help="anode: number of checkpoints.", rich_help_panel=SOLVER)] = 1,
    t1: Annotated[float, typer.Option("--t1", help="Integration time [0, t1] of each ODE block.", rich_help_panel=SOLVER)] = 1.0,
    solver_regime: Annotated[str, typer.Option("--solver-regime", help=help_line(REGIME_HELP), rich_help_panel=REGIME)] = "standalone",
    u_set: Annotated[str | None, typer.Option("--u-set", help="switching/ensembling: u values [0.5,1.0].", show_default=False, rich_help_panel=REGIME)] = None,
    u_mean: Annotated[float | None, typer.Option("--u-mean", help="smoothing: mean of u [--u].", show_default=False, rich_help_panel=REGIME)] = None,
    u_std: Annotated[float, typer.Option("--u-std", help="smoothing: standard deviation of u (thesis: 0.0125).", rich_help_panel=REGIME)] = 0.0125,
    ensemble_weights: Annotated[str | None, typer.Option("--ensemble-weights", help="ensembling: one weight per --u-set value [equal].", show_default=False, rich_help_panel=REGIME)] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="Passes over the training data [classify: 10].", show_default=False, rich_help_panel=TRAIN)] = None,
    iters: Annotated[int | None, typer.Option("--iters", help="Training iterations (overrides --epochs) [density: 1000].", show_default=False, rich_help_panel=TRAIN)] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Training batch size.", rich_help_panel=TRAIN)] = 64,
    lr: Annotated[float, typer.Option("--lr", help="Learning rate.", rich_help_panel=TRAIN)] = 1e-2,
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam | sgd (momentum 0.9) | gnvpro | slimtrain (VarPro).", rich_help_panel=TRAIN)] = "adam",
    lr_schedule: Annotated[str, typer.Option("--lr-schedule", help="constant | cosine | step (x0.1 at 50% and 75%).", rich_help_panel=TRAIN)] = "cosine",
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="L2 weight decay.", rich_help_panel=TRAIN)] = 0.0,
    augment: Annotated[bool, typer.Option("--augment", help="Random crops (+ flips for RGB) on image data.", rich_help_panel=TRAIN)] = False,
    eval_every: Annotated[int | None, typer.Option("--eval-every", help="density: iterations between test evaluations [iters/10].", show_default=False, rich_help_panel=TRAIN)] = None,
    eval_samples: Annotated[int | None, typer.Option("--eval-samples", help="Evaluate on this many test samples [all].", show_default=False, rich_help_panel=TRAIN)] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue training an odekit ODE checkpoint (weights; optimizer restarts).", show_default=False, rich_help_panel=TRAIN)] = None,
    # issue 14: VarPro training of separable networks
    depth: Annotated[int, typer.Option("--depth", min=1, help="odenet_antisym: cells d of the weight grid in t (RK4 steps default to d).", rich_help_panel=ARCH)] = 8,
    regularization: Annotated[str, typer.Option("--regularization", help="VarPro: alpha_theta,alpha_W (Tikhonov on the features' weights and on W).", rich_help_panel=VARPRO)] = "1e-3,1e-3",
    levels: Annotated[int, typer.Option("--levels", min=1, help="VarPro multilevel: train odenet_antisym at depth d, 2d, ..., 2^(L-1) d.", rich_help_panel=VARPRO)] = 1,
    compare: Annotated[str | None, typer.Option("--compare", help="VarPro: also train these optimizers from the same init, e.g. adam,slimtrain (curves on one plot).", show_default=False, rich_help_panel=VARPRO)] = None,
    krylov_rank: Annotated[int, typer.Option("--krylov-rank", min=1, help="gnvpro: r, the most Gauss-Newton products per outer iteration.", rich_help_panel=VARPRO)] = 10,
    radius: Annotated[float, typer.Option("--radius", help="gnvpro: initial trust-region radius.", rich_help_panel=VARPRO)] = 0.1,
    work_units: Annotated[float | None, typer.Option("--work-units", help="VarPro: stop each optimizer after this many work units.", show_default=False, rich_help_panel=VARPRO)] = None,
    samples: Annotated[int, typer.Option("--data-size", min=2, help="--data cdr: samples generated (80% train, 20% test).", rich_help_panel=DATA)] = 2000,
    device: DeviceOpt = "auto",
    seed: SeedOpt = 0,
    out: OutOpt = None,
    force: ForceOpt = False,
    json_output: JsonOpt = False,
    debug: DebugOpt = False,
    threads: ThreadsOpt = None,
) -> None:  # fmt: skip
    """Train a neural ODE: ODENet4/ODENet10 image classifier or a 2-D CNF density model."""
    common = CommonOptions(device=device, seed=seed, out=out, force=force, json=json_output, debug=debug, threads=threads)
    params = {k: v for k, v in locals().items() if k not in ("common", "out", "force", "json_output", "debug")}
    params = {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}
    # imported after locals() above was read, and here rather than at module level for a fast --help
    from odekit.cli.train_separable import SeparableOptions, run_separable, wants_separable
    from odekit.io.checkpoints import load_model, save_model
    from odekit.io.datasets import load_dataset
    from odekit.io.toy2d import TOY_DATASETS, load_toy
    from odekit.methods.ode_train import (
        ODETrainSettings,
        RegimeSettings,
        check_u,
        ode_checkpoint_meta,
        train_cnf,
        train_ode_classifier,
    )
    from odekit.models import build_model
    from odekit.models.ode_models import ACTIVATIONS, CNF, NORMS, TRACE_MODES, set_solver
    from odekit.ode import InterpolationWarning
    arch_opts = {"width": width, "norm_first": norm_first, "norm_ode": norm_ode, "activation": activation}

    def body(ctx: CommandContext) -> CommandOutput:
        key = task.strip().lower()
        if key not in TASKS:
            raise UsageError(f"unknown task '{task}'", f"choose one of {', '.join(TASKS)}")
        if key != "density" and wants_separable(key, model, optimizer, compare, levels):
            return _separable(ctx, key)
        model_path, curves_path = ctx.path("model.safetensors"), ctx.path("curves.png")
        density_path = ctx.path("density.png") if key == "density" else None
        for name in ("norm_first", "norm_ode"):
            value = arch_opts[name]
            if isinstance(value, str) and value.lower() not in NORMS:
                raise UsageError(f"unknown normalization '{value}' for --{name.replace('_', '-')}", f"choose one of {', '.join(NORMS)}")
        if activation is not None and activation not in ACTIVATIONS:
            raise UsageError(f"unknown activation '{activation}'", f"choose one of {', '.join(ACTIVATIONS)}")
        if trace not in TRACE_MODES:
            raise UsageError(f"unknown trace mode '{trace}'", f"choose one of {', '.join(TRACE_MODES)}")
        check_u(u, "--u")
        default_solver = "dopri5" if key == "density" else "rk2"
        config = _solver_config(solver or default_solver, steps, u, rtol, atol, grad, cheb_nodes, checkpoints, t1, key, adjoint_rtol, adjoint_atol, seminorm)
        regime = RegimeSettings(
            kind=solver_regime, u=u, u_set=_floats(u_set, "--u-set"), u_mean=u_mean, u_std=u_std,
            weights=_floats(ensemble_weights, "--ensemble-weights"), seed=seed,
        )  # fmt: skip
        regime.check_solver(config)
        settings = ODETrainSettings(
            epochs=epochs, iters=iters, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=lr_schedule,
            weight_decay=weight_decay, augment=augment, eval_every=eval_every, eval_samples=eval_samples, seed=seed,
        )  # fmt: skip
        loaded = _resume(ctx, key)
        if loaded is not None:
            _check_resume_compatible(loaded, key, model, arch_opts)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InterpolationWarning)
            if key == "classify":
                output = _classify(ctx, config, regime, settings, loaded, model_path, curves_path)
            else:
                assert density_path is not None
                output = _density(ctx, config, regime, settings, loaded, model_path, curves_path, density_path)
        _interpolation_warning_once(ctx, config, caught)
        return output

    def _separable(ctx: CommandContext, key: str) -> CommandOutput:
        options = SeparableOptions(
            task=key, data=data, data_dir=str(data_dir) if data_dir else None, model=model, width=width, depth=depth,
            activation=activation, solver=solver, steps=steps, t1=t1, optimizer=optimizer, compare=compare,
            regularization=regularization, levels=levels, krylov_rank=krylov_rank, radius=radius, work_units=work_units,
            iters=iters, epochs=epochs, batch_size=batch_size, lr=lr, samples=samples, seed=seed,
        )  # fmt: skip
        return run_separable(ctx, options, _resume(ctx, key))

    def _resume(ctx: CommandContext, key: str) -> LoadedModel | None:
        if resume is None:
            return None
        loaded = load_model(resume)
        ctx.inputs["resume"] = {"path": str(resume), "sha256": loaded.sha256, "arch": loaded.meta.arch}
        return loaded

    def _classify(ctx, config, regime, settings, loaded, model_path, curves_path) -> CommandOutput:
        # issue 11: explicit preprocessing wins over what a resumed checkpoint recorded
        prep = Preprocessing.from_options(normalize, input_shape, layout, pixel_max)
        given_norm = prep.normalize.as_dict() if prep.normalize else None
        if loaded is not None:
            dataset = load_dataset(data or (loaded.meta.dataset or {}).get("name", "digits"), data_dir=data_dir,
                                   input_shape=prep.input_shape or loaded.meta.input_shape,
                                   normalization=given_norm if prep.normalize else loaded.meta.normalization,
                                   **prep.npz_options())  # fmt: skip
            arch, args, net = loaded.meta.arch, dict(loaded.meta.args), loaded.model
        else:
            name = data or "digits"
            if name.strip().lower() in TOY_DATASETS:
                raise UsageError(f"'{name}' is a 2-D toy density, not an image data set", "use --task density for toys")
            dataset = load_dataset(name, data_dir=data_dir, input_shape=prep.input_shape, normalization=given_norm, **prep.npz_options())
            if len(dataset.input_shape) != 3:
                raise UsageError(f"ODENets need images (C,H,W); '{dataset.name}' has shape {list(dataset.input_shape)}",
                                 "choose an image data set")  # fmt: skip
            arch = (model or "odenet4").lower()
            if arch not in CLASSIFIER_ARCHS:
                raise UsageError(f"unknown classifier model '{model}'", f"choose one of {', '.join(CLASSIFIER_ARCHS)}")
            args = _arch_args("classify", arch, {**arch_opts, "stem_stride": stem_stride, "pool": pool},
                              dataset.input_shape[0], dataset.num_classes)  # fmt: skip
            net = build_model(arch, {**args, "solver": config.to_dict()})
        set_solver(net, config)
        args["solver"] = config.to_dict()
        ctx.inputs["data"] = {**dataset.describe(), "normalization": dataset.normalization()}
        result = train_ode_classifier(net, dataset, settings, regime, ctx.device, progress=ctx.progress, dist=ctx.dist)
        meta = ode_checkpoint_meta(
            arch, args, num_classes=dataset.num_classes, input_shape=list(dataset.input_shape),
            normalization=dataset.normalization(), dataset=dataset.describe(), config=config, regime=regime,
            result=result, task="classify", previous=loaded.meta if loaded else None,
            source_sha256=loaded.sha256 if loaded else None,
        )  # fmt: skip
        save_model(model_path, net.cpu(), meta, force=ctx.force)
        _plot_curves(curves_path, result.history, "classify", ctx.force)
        return _output("classify", arch, args, net, config, result, dataset.name, model_path, [curves_path])

    def _density(ctx, config, regime, settings, loaded, model_path, curves_path, density_path) -> CommandOutput:
        if loaded is not None:
            name = data or (loaded.meta.dataset or {}).get("name", "pinwheel")
            arch, args, net = "cnf", dict(loaded.meta.args), loaded.model
        else:
            name = data or "pinwheel"
            if (model or "cnf").lower() != "cnf":
                raise UsageError(f"--task density trains a cnf, not '{model}'", "drop --model for density tasks")
            if arch_opts["width"] is not None or arch_opts["norm_first"] or arch_opts["norm_ode"]:
                raise UsageError("--width/--norm-first/--norm-ode are ODENet options", "use --hidden for the CNF")
            arch = "cnf"
            args = _arch_args("density", arch, {**arch_opts, "hidden": _ints(hidden, "--hidden"), "trace": trace}, 2, 0)
            net = build_model(arch, {**args, "solver": config.to_dict()})
        if name.strip().lower() not in TOY_DATASETS:
            raise UsageError(f"'{name}' is not a 2-D toy data set", f"choose one of {', '.join(TOY_DATASETS.names())}")
        if ctx.dist.world_size > 1:
            raise UsageError(
                f"--task density trains on one process ({ctx.dist.world_size} ranks were launched)",
                "run density tasks without torchrun; --task classify runs data-parallel",
            )
        toy = load_toy(name, train_samples, test_samples, seed)
        assert isinstance(net, CNF)  # arch 'cnf' builds one
        set_solver(net, config)
        args["solver"] = config.to_dict()
        ctx.inputs["data"] = toy.describe()
        result = train_cnf(net, toy, settings, regime, ctx.device, progress=ctx.progress)
        meta = ode_checkpoint_meta(
            arch, args, num_classes=None, input_shape=[2], normalization=None, dataset=toy.describe(),
            config=config, regime=regime, result=result, task="density",
            previous=loaded.meta if loaded else None, source_sha256=loaded.sha256 if loaded else None,
        )  # fmt: skip
        _plot_density(density_path, net, toy, ctx.device, ctx.force)
        save_model(model_path, net.cpu(), meta, force=ctx.force)
        _plot_curves(curves_path, result.history, "density", ctx.force)
        return _output("density", arch, args, net, config, result, toy.name, model_path, [curves_path, density_path])

    run_command("train-ode", common, inputs={}, params=params, body=body, run_name=task, distributed=True)


def _output(
    task: str, arch: str, args: dict[str, Any], net: torch.nn.Module, config: SolverConfig,
    result: ODETrainResult, data_name: str, model_path: Path, plots: list[Path],
) -> CommandOutput:  # fmt: skip
    from odekit.models.ode_models import ode_blocks

    metric = "test_accuracy" if task == "classify" else "test_nll"
    results = {
        "task": task,
        "arch": arch,
        "model_args": args,
        "data": data_name,
        "solver": config.solver,
        "steps": config.steps,
        "grad_method": config.grad,
        "solver_config": config.to_dict(),
        "nfe_per_solve": config.nfe_per_solve(),
        "ode_blocks": len(ode_blocks(net)),
        "regime": result.regime,
        "final_metrics": result.final_metrics,
        "iterations": result.iterations,
        "nfe_forward": result.nfe_forward,
        "nfe_backward": result.nfe_backward,
        "interp_error": result.interp_error,
        "interp_tol": result.interp_tol,
        "seconds_per_iter": result.seconds_per_iter,
        "train_seconds": result.train_seconds,
        "params": sum(p.numel() for p in net.parameters()),
        "history": result.history,
        "model": str(model_path),
        "plots": [str(p) for p in plots],
    }
    solver_text = f"{config.solver} n={config.steps}" if config.steps else f"{config.solver} rtol={config.rtol:g}"
    value = result.final_metrics.get(metric, float("nan"))
    headline = [
        f"{arch} on {data_name}: {metric} {value:.4f} ({solver_text}, grad {config.grad}, regime {result.regime['regime']}); "
        f"{result.iterations} iterations, {1e3 * result.seconds_per_iter:.1f} ms/iter, "
        f"NFE per iteration forward {result.nfe_forward:.1f} / backward {result.nfe_backward:.1f}",
        f"Model: {model_path}",
    ]
    columns = ["iteration", "epoch", "train_loss", *(["test_loss", "test_accuracy"] if task == "classify" else ["test_nll", "bits_per_dim"])]
    rows = [[h.get(c, float("nan")) for c in columns] for h in result.history]
    return CommandOutput(results=results, tables=[ResultTable("Training history", columns, rows)], headline=headline)

