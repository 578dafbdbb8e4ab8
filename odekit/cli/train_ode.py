"""`odekit train-ode`: train an ODENet classifier or a CNF density model end to end."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

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
from odekit.cli.runner import (
    DEFAULT_RUNS_DIR,
    CommandContext,
    CommandOutput,
    ResultTable,
    run_command,
)
from odekit.errors import UsageError
from odekit.io.preprocessing import Preprocessing

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch (issue 12)
    import torch

    from odekit.io.checkpoints import LoadedModel
    from odekit.io.toy2d import ToyData
    from odekit.methods.ode_train.jobs import ODEJobResult
    from odekit.models.ode_models import CNF
    from odekit.ode import SolverConfig

TASKS = ("classify", "density", "regress")
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

  odekit train-ode --task regress --data cdr-transient --optimizer gnvpro --tr-solver gmres-subspace --krylov-rank 20 --width 8 --depth 2 --levels 3 --compare lbfgs,adam

  odekit train-ode --model odenet_antisym --data digits --optimizer gnvpro --levels 2 --depth 4

Writes model.safetensors (its metadata records the training solver, so smoothness-check and
attack know it), curves.png (and density.png for 2-D toys), report.json and report.md.
VarPro (--task regress, --optimizer gnvpro|lbfgs|slimtrain, --model odenet_antisym, --compare,
--levels) writes convergence.png instead of curves.png: loss vs work units (a forward or a
backward pass over the training set = 1 unit; GNvpro adds 2r per outer iteration, L-BFGS
counts 2 per evaluation) and says whether Gauss-Newton models the data well.
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
    task: Annotated[str, typer.Option("--task", help="classify (ODENet on images) | density (CNF on a 2-D toy) | regress (least squares; --data cdr, cdr-transient or .npz).")] = "classify",
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
    optimizer: Annotated[str, typer.Option("--optimizer", help="adam | sgd (momentum 0.9) | gnvpro | lbfgs | slimtrain (VarPro).", rich_help_panel=TRAIN)] = "adam",
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
    radius: Annotated[float | None, typer.Option("--radius", help="gnvpro: initial trust-region radius [steihaug: 0.1; gmres-subspace: the full Gauss-Newton step].", show_default=False, rich_help_panel=VARPRO)] = None,
    tr_solver: Annotated[str, typer.Option("--tr-solver", help="gnvpro step: steihaug (truncated CG, r products) | gmres-subspace (the paper's: Arnoldi basis of r products, exact trust-region step in it, reused on rejection).", rich_help_panel=VARPRO)] = "steihaug",
    work_units: Annotated[float | None, typer.Option("--work-units", help="VarPro: stop each optimizer after this many work units.", show_default=False, rich_help_panel=VARPRO)] = None,
    samples: Annotated[int | None, typer.Option("--data-size", min=2, help="--data cdr: samples generated, 80% train / 20% test [2000]; cdr-transient: 50/25/25 train/validation/test [800].", show_default=False, rich_help_panel=DATA)] = None,
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
    from odekit.cli.train_separable import parse_regularization, run_separable
    from odekit.io.checkpoints import load_model, save_model
    from odekit.methods.ode_train import ODETrainSettings, RegimeSettings, check_u
    from odekit.methods.ode_train.jobs import (
        ODEArchOptions,
        ODEJobSettings,
        run_ode_job,
        solver_config,
    )
    from odekit.methods.varpro.job import SeparableJobSettings, optimizer_names, wants_separable
    from odekit.models.ode_models import CNF
    from odekit.ode import InterpolationWarning

    def body(ctx: CommandContext) -> CommandOutput:
        key = task.strip().lower()
        if key not in TASKS:
            raise UsageError(f"unknown task '{task}'", f"choose one of {', '.join(TASKS)}")
        if key != "density" and wants_separable(key, model, optimizer, compare, levels):
            return _separable(ctx, key)
        model_path, curves_path = ctx.path("model.safetensors"), ctx.path("curves.png")
        density_path = ctx.path("density.png") if key == "density" else None
        arch = ODEArchOptions(model=model, width=width, norm_first=norm_first, norm_ode=norm_ode, activation=activation,
                              pool=pool, stem_stride=stem_stride, hidden=hidden, trace=trace)  # fmt: skip
        check_u(u, "--u")
        config = solver_config(
            key, solver, steps=steps, u=u, rtol=rtol, atol=atol, grad=grad, cheb_nodes=cheb_nodes, checkpoints=checkpoints,
            t1=t1, adjoint_rtol=adjoint_rtol, adjoint_atol=adjoint_atol, seminorm=seminorm,
        )  # fmt: skip
        regime = RegimeSettings(
            kind=solver_regime, u=u, u_set=_floats(u_set, "--u-set"), u_mean=u_mean, u_std=u_std,
            weights=_floats(ensemble_weights, "--ensemble-weights"), seed=seed,
        )  # fmt: skip
        settings = ODETrainSettings(
            epochs=epochs, iters=iters, batch_size=batch_size, lr=lr, optimizer=optimizer, schedule=lr_schedule,
            weight_decay=weight_decay, augment=augment, eval_every=eval_every, eval_samples=eval_samples, seed=seed,
        )  # fmt: skip
        loaded = _resume(ctx)
        prep = Preprocessing.from_options(normalize, input_shape, layout, pixel_max) if key == "classify" else None
        job = ODEJobSettings(
            task=key, solver=config, regime=regime, train=settings, arch=arch, data=data, data_dir=data_dir,
            preprocessing=prep, train_samples=train_samples, test_samples=test_samples, seed=seed,
        )  # fmt: skip
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", InterpolationWarning)
            result = run_ode_job(job, loaded, ctx.device, progress=ctx.progress, dist=ctx.dist)
        _interpolation_warning_once(ctx, config, caught)
        ctx.inputs["data"] = result.data_info
        plots = [curves_path]
        if density_path is not None:  # drawn on the training device, before save_model moves the model to the CPU
            assert result.toy is not None and isinstance(result.model, CNF)
            _plot_density(density_path, result.model, result.toy, ctx.device, ctx.force)
            plots.append(density_path)
        save_model(model_path, result.model.cpu(), result.meta, force=ctx.force)
        _plot_curves(curves_path, result.training.history, key, ctx.force)
        return _output(result, model_path, plots)

    def _separable(ctx: CommandContext, key: str) -> CommandOutput:
        alpha_theta, alpha_w = parse_regularization(regularization)
        cache = data_dir or (DEFAULT_RUNS_DIR / "cache" if key == "regress" else None)
        settings = SeparableJobSettings(
            task=key, optimizers=optimizer_names(optimizer, compare), data=data, data_dir=cache, model=model, width=width,
            depth=depth, activation=activation, solver=solver, steps=steps, t1=t1, alpha_theta=alpha_theta, alpha_w=alpha_w,
            levels=levels, krylov_rank=krylov_rank, radius=radius, tr_solver=tr_solver.strip().lower(), work_units=work_units, iters=iters, epochs=epochs,
            batch_size=batch_size, lr=lr, data_size=samples, seed=seed,
        )  # fmt: skip
        return run_separable(ctx, settings, _resume(ctx))

    def _resume(ctx: CommandContext) -> LoadedModel | None:
        if resume is None:
            return None
        loaded = load_model(resume)
        ctx.inputs["resume"] = {"path": str(resume), "sha256": loaded.sha256, "arch": loaded.meta.arch}
        return loaded

    run_command("train-ode", common, inputs={}, params=params, body=body, run_name=task, distributed=True)


def _output(result: ODEJobResult, model_path: Path, plots: list[Path]) -> CommandOutput:
    config, training, metric = result.config, result.training, result.metric
    results = {**result.to_dict(), "model": str(model_path), "plots": [str(p) for p in plots]}
    solver_text = f"{config.solver} n={config.steps}" if config.steps else f"{config.solver} rtol={config.rtol:g}"
    value = training.final_metrics.get(metric, float("nan"))
    headline = [
        f"{result.arch} on {result.data_name}: {metric} {value:.4f} ({solver_text}, grad {config.grad}, "
        f"regime {training.regime['regime']}); {training.iterations} iterations, {1e3 * training.seconds_per_iter:.1f} ms/iter, "
        f"NFE per iteration forward {training.nfe_forward:.1f} / backward {training.nfe_backward:.1f}",
        f"Model: {model_path}",
    ]
    extra = ["test_loss", "test_accuracy"] if result.task == "classify" else ["test_nll", "bits_per_dim"]
    columns = ["iteration", "epoch", "train_loss", *extra]
    rows = [[h.get(c, float("nan")) for c in columns] for h in training.history]
    return CommandOutput(results=results, tables=[ResultTable("Training history", columns, rows)], headline=headline)
