"""Training loops for neural ODEs: classifiers (ODENet) and CNF density estimation.

The meta-solver regimes of thesis ch. 4.2 change RK2's parameter u during training:
standalone (fixed u), switching (u drawn each iteration from a finite set), smoothing
(u ~ Normal(u_mean, u_std), redrawn until it lies in (0, 1]) and ensembling (the ODE block
returns the weighted average of the solves with every u of the set). All draws are seeded.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.errors import NumericalError, UsageError
from odekit.io.checkpoints import ModelMeta
from odekit.io.datasets import Dataset, Split
from odekit.io.toy2d import ToyData
from odekit.models.ode_models import CNF, nfe_counts, ode_blocks, set_u
from odekit.ode import SolverConfig
from odekit.progress import Progress, silent_if_none
from odekit.registry import Registry

REGIMES: Registry[str] = Registry("solver regime")
REGIMES.add("standalone", "standalone", "one fixed solver (the --solver/--u given)")
REGIMES.add("switching", "switching", "RK2(u), u drawn uniformly from --u-set every iteration")
REGIMES.add("smoothing", "smoothing", "RK2(u), u ~ Normal(--u-mean, --u-std) redrawn into (0, 1] every iteration")
REGIMES.add("ensembling", "ensembling", "RK2: the block returns the weighted mean of the solves with every u in --u-set")

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")
DEFAULT_U_SET = (0.5, 1.0)
MAX_REDRAWS = 1000


def check_u(u: float, what: str) -> None:
    if not (math.isfinite(u) and 0.0 < u <= 1.0):
        raise UsageError(f"{what} must lie in (0, 1], got {u}", "RK2(u) needs 0 < u <= 1 (0.5 midpoint, 1 Heun)")


@dataclass(frozen=True)
class RegimeSettings:
    """How u changes during training (thesis ch. 4.2); validated on construction."""

    kind: str = "standalone"
    u: float = 0.5
    u_set: tuple[float, ...] = ()
    u_mean: float | None = None
    u_std: float = 0.0125
    weights: tuple[float, ...] = ()
    seed: int = 0

    def __post_init__(self) -> None:
        kind = REGIMES.entry(self.kind).name
        object.__setattr__(self, "kind", kind)
        check_u(self.u, "--u")
        u_set = tuple(float(v) for v in self.u_set) or (DEFAULT_U_SET if kind in ("switching", "ensembling") else ())
        for value in u_set:
            check_u(value, "every value of --u-set")
        object.__setattr__(self, "u_set", u_set)
        mean = self.u if self.u_mean is None else float(self.u_mean)
        check_u(mean, "--u-mean")
        object.__setattr__(self, "u_mean", mean)
        if not (math.isfinite(self.u_std) and self.u_std >= 0):
            raise UsageError(f"--u-std must be a finite number >= 0, got {self.u_std}", "the thesis uses 0.0125")
        weights = tuple(float(w) for w in self.weights)
        if kind == "ensembling":
            weights = weights or tuple(1.0 for _ in u_set)
            if len(weights) != len(u_set):
                raise UsageError(
                    f"--ensemble-weights has {len(weights)} values but --u-set has {len(u_set)}",
                    "give one weight per u",
                )
            if any(not math.isfinite(w) or w < 0 for w in weights) or sum(weights) <= 0:
                raise UsageError(f"ensemble weights must be >= 0 with a positive sum, got {list(weights)}")
            weights = tuple(w / sum(weights) for w in weights)
        elif weights:
            raise UsageError("--ensemble-weights only applies to --solver-regime ensembling")
        object.__setattr__(self, "weights", weights)

    def check_solver(self, config: SolverConfig) -> None:
        """Only RK2 has a u to change: the non-standalone regimes need --solver rk2."""
        if self.kind != "standalone" and config.solver != "rk2":
            raise UsageError(
                f"solver regime '{self.kind}' changes RK2's parameter u, but the solver is '{config.solver}'",
                "use --solver rk2 with --steps N",
            )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["u_set"], out["weights"] = list(self.u_set), list(self.weights)
        return out


class USampler:
    """Seeded draws of u per training iteration; ``trace`` keeps every u drawn."""

    def __init__(self, settings: RegimeSettings) -> None:
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)
        self.trace: list[float] = []

    def draw(self) -> tuple[float | None, list[tuple[float, float]] | None]:
        """(u for the next iteration or None = the config's u, ensemble [(u, w)] or None)."""
        s = self.settings
        if s.kind == "standalone":
            return None, None
        if s.kind == "ensembling":
            return None, list(zip(s.u_set, s.weights, strict=True))
        if s.kind == "switching":
            u = float(s.u_set[int(self.rng.integers(len(s.u_set)))])
        else:
            u = self._smooth()
        self.trace.append(u)
        return u, None

    def _smooth(self) -> float:
        s = self.settings
        assert s.u_mean is not None
        for _ in range(MAX_REDRAWS):
            u = float(self.rng.normal(s.u_mean, s.u_std))
            if 0.0 < u <= 1.0:
                return u
        raise UsageError(
            f"Normal({s.u_mean}, {s.u_std}) almost never falls in (0, 1]", "lower --u-std or move --u-mean inside (0, 1]"
        )

    def summary(self) -> dict[str, Any]:
        s = self.settings
        out: dict[str, Any] = {"regime": s.kind}
        if s.kind == "ensembling":
            out["ensemble"] = [{"u": u, "weight": w} for u, w in zip(s.u_set, s.weights, strict=True)]
        if self.trace:
            values = np.asarray(self.trace)
            out.update(
                draws=len(values), u_mean=float(values.mean()), u_std=float(values.std()),
                u_min=float(values.min()), u_max=float(values.max()), first_draws=[round(v, 6) for v in self.trace[:8]],
            )  # fmt: skip
            if s.kind == "switching":
                out["counts"] = {str(u): int((values == u).sum()) for u in s.u_set}
        return out


@dataclass(frozen=True)
class ODETrainSettings:
    """Optimisation settings shared by both tasks; steps = iters, or epochs x batches."""

    epochs: int | None = None
    iters: int | None = None
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    schedule: str = "constant"
    weight_decay: float = 0.0
    momentum: float = 0.9
    augment: bool = False
    eval_every: int | None = None
    eval_samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("epochs", "iters", "eval_every", "eval_samples"):
            value = getattr(self, name)
            if value is not None and (int(value) != value or value < 1):
                raise UsageError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.batch_size < 1:
            raise UsageError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise UsageError(f"--lr must be positive, got {self.lr}", "try 1e-3 with adam")
        if self.weight_decay < 0:
            raise UsageError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer '{self.optimizer}'", f"choose one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown lr schedule '{self.schedule}'", f"choose one of {', '.join(SCHEDULES)}")

    def total_steps(self, batches_per_epoch: int, default_epochs: int) -> int:
        if self.iters is not None:
            return int(self.iters)
        return int(self.epochs or default_epochs) * batches_per_epoch


@dataclass
class ODETrainResult:
    """Per-evaluation history and the run's averages (NFE and seconds per training iteration)."""

    history: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    iterations: int = 0
    nfe_forward: float = 0.0
    nfe_backward: float = 0.0
    seconds_per_iter: float = 0.0
    train_seconds: float = 0.0
    regime: dict[str, Any] = field(default_factory=dict)
    stopped_early: bool = False
    interp_error: float | None = None  # irdm: largest interpolation error estimate of any solve
    interp_tol: float | None = None


def _optimizer(model: nn.Module, s: ODETrainSettings, total: int) -> tuple[torch.optim.Optimizer, Any]:
    params = [p for p in model.parameters() if p.requires_grad]
    if s.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay)
    else:
        opt = torch.optim.Adam(params, lr=s.lr, weight_decay=s.weight_decay)
    if s.schedule == "cosine":
        sched: Any = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, total))
    elif s.schedule == "step":  # x0.1 at 50% and 75% of training, as the thesis' step schedules
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, [max(1, total // 2), max(1, 3 * total // 4)], 0.1)
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    return opt, sched


def augment_images(x: Tensor, generator: torch.Generator) -> Tensor:
    """Random crops (zero padding of 1/8 of the side) and, for RGB images, horizontal flips."""
    n, c, h, w = x.shape
    pad = max(1, min(h, w) // 8)
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    if c == 3:  # flipping digits changes their meaning; natural images keep it
        flip = torch.rand(n, generator=generator) < 0.5
        out[flip.to(out.device)] = out[flip.to(out.device)].flip(-1)
    return out


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless shuffled index batches, reshuffled every epoch; yields (epoch, index, last_in_epoch)."""
    epoch = 0
    while True:
        order = torch.randperm(n, generator=generator)
        starts = list(range(0, n, batch_size))
        for j, start in enumerate(starts):
            yield epoch, order[start : start + batch_size], j == len(starts) - 1
        epoch += 1


def _check_loss(loss: Tensor, step: int) -> None:
    if not bool(torch.isfinite(loss)):
        raise NumericalError(
            f"training diverged at iteration {step} (loss is {loss.item()})",
            "lower --lr, or use more --steps / tighter --rtol",
        )


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, split: Split, device: torch.device, batch_size: int = 512, dist: Distributed | None = None
) -> dict[str, float]:
    """Test accuracy, cross-entropy and forward NFE per batch with the blocks' current solver.
    ``dist``: each rank evaluates its shard of ``split``; the sums are all-reduced."""
    model.eval()
    if dist is not None and dist.world_size > 1:
        part = dist.shard(len(split))
        shard = Split(split.x[part.start : part.stop], split.y[part.start : part.stop])
        local = evaluate_classifier(model, shard, device, batch_size)
        n_local, n_batches = len(shard), shard.num_batches(batch_size)
        correct, loss, nfe, batches = dist.sum_numbers(
            local["test_accuracy"] * n_local, local["test_loss"] * n_local,
            local["nfe_per_forward"] * n_batches, n_batches,
        )  # fmt: skip
        n = max(len(split), 1)
        return {"test_accuracy": correct / n, "test_loss": loss / n, "nfe_per_forward": nfe / max(batches, 1)}
    correct, loss, nfe, batches = 0, 0.0, 0, 0
    for x, y in split.batches(batch_size, device):
        logits = model(x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        nfe += nfe_counts(model)[0]
        batches += 1
    n = max(len(split), 1)
    return {"test_accuracy": correct / n, "test_loss": loss / n, "nfe_per_forward": nfe / max(batches, 1)}


@torch.no_grad()
def evaluate_cnf(model: CNF, x: Tensor, device: torch.device, batch_size: int = 1000) -> dict[str, float]:
    """Test negative log-likelihood (nats per sample) and bits/dim."""
    model.eval()
    total, nfe, batches = 0.0, 0, 0
    for start in range(0, len(x), batch_size):
        log_p = model.log_prob(x[start : start + batch_size].to(device))
        total += float(-log_p.sum())
        nfe += nfe_counts(model)[0]
        batches += 1
    nll = total / max(len(x), 1)
    if not math.isfinite(nll):
        raise NumericalError("the test log-likelihood is not finite", "lower --lr or tighten --rtol/--atol")
    return {"test_nll": nll, "bits_per_dim": nll / (model.dim * math.log(2)), "nfe_per_forward": nfe / max(batches, 1)}


@torch.no_grad()
def density_grid(model: CNF, points: Tensor, device: torch.device, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """log p(x) of ``model`` on a size x size grid covering ``points`` (for the density plot)."""
    lo = float(points.min()) - 0.5
    hi = float(points.max()) + 0.5
    axis = torch.linspace(lo, hi, size)
    gx, gy = torch.meshgrid(axis, axis, indexing="xy")
    grid = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    model.eval()
    log_p = torch.cat([model.log_prob(grid[i : i + 1024].to(device)).cpu() for i in range(0, len(grid), 1024)])
    return gx.numpy(), gy.numpy(), log_p.reshape(size, size).numpy()


StopRule = Callable[[dict[str, float]], bool]


class _Loop:
    """Shared bookkeeping: optimizer, regime draws, NFE/time averages, evaluation records."""

    def __init__(self, model: nn.Module, s: ODETrainSettings, regime: RegimeSettings, total: int,
                 progress: Progress | None, dist: Distributed | None = None) -> None:  # fmt: skip
        blocks = ode_blocks(model)
        if not blocks:
            raise UsageError("the model has no ODE block", "train-ode trains odenet4, odenet10 or cnf models")
        regime.check_solver(blocks[0].config)
        self.model, self.settings, self.total = model, s, total
        self.progress = silent_if_none(progress)
        self.optimizer, self.scheduler = _optimizer(model, s, total)
        self.sampler = USampler(regime)
        self.result = ODETrainResult()
        self.nfe_f = self.nfe_b = 0
        self.window: list[float] = []
        self.seconds = 0.0
        self.dist = dist if dist is not None and dist.world_size > 1 else None

    def step(self, loss_fn: Callable[[], Tensor], step: int, share: float = 1.0) -> float:
        """One optimizer step. ``share``: this rank's fraction of the global batch; with several
        ranks the gradients are weighted by it and summed, i.e. those of the whole batch."""
        u, ensemble = self.sampler.draw()
        set_u(self.model, u, ensemble)
        self.model.train()
        start = time.perf_counter()
        loss = loss_fn()
        _check_loss(loss, step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.dist is not None:  # one all-reduce of every gradient, flattened
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            summed = self.dist.all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]) * share)
            offset = 0
            for g in grads:
                g.copy_(summed[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
        self.optimizer.step()
        self.scheduler.step()
        self.seconds += time.perf_counter() - start
        f, b = nfe_counts(self.model)
        self.nfe_f += f
        self.nfe_b += b
        self._track_interpolation()
        value = float(loss.detach())
        self.window.append(value)
        self.progress.update(loss=value, nfe_f=f, nfe_b=b)
        return value

    def _track_interpolation(self) -> None:
        """irdm: keep the worst interpolation-error estimate of the latest solves."""
        r = self.result
        for block in ode_blocks(self.model):
            for st in getattr(block, "call_stats", None) or [block.last_stats]:
                if st.interp_error is not None and (r.interp_error is None
                                                    or st.interp_error > r.interp_error):
                    r.interp_error, r.interp_tol = st.interp_error, st.interp_tol

    def record(self, step: int, epoch: float, metrics: dict[str, float]) -> dict[str, float]:
        set_u(self.model, None, None)  # evaluate with the model's own (standalone) solver
        rec = {
            "iteration": step,
            "epoch": round(epoch, 4),
            "train_loss": float(np.mean(self.window)) if self.window else float("nan"),
            **metrics,
            "train_seconds": round(self.seconds, 4),
        }
        self.window = []
        self.result.history.append(rec)
        return rec

    def finish(self, steps_done: int, final: dict[str, float], stopped: bool) -> ODETrainResult:
        set_u(self.model, None, None)
        r = self.result
        r.iterations = steps_done
        r.final_metrics = final
        r.nfe_forward = self.nfe_f / max(steps_done, 1)
        r.nfe_backward = self.nfe_b / max(steps_done, 1)
        r.train_seconds = self.seconds
        r.seconds_per_iter = self.seconds / max(steps_done, 1)
        r.regime = self.sampler.summary()
        r.stopped_early = stopped
        self.model.eval()
        return r


def train_ode_classifier(
    model: nn.Module,
    data: Dataset,
    settings: ODETrainSettings,
    regime: RegimeSettings,
    device: torch.device,
    *,
    progress: Progress | None = None,
    stop_when: StopRule | None = None,
    dist: Distributed | None = None,
) -> ODETrainResult:
    """Train an ODENet in place with cross-entropy; evaluates on the test split every epoch.

    ``stop_when(record)`` ends training early (benchmarks: time to a target accuracy).
    ``dist`` (several ranks): data parallel; every rank draws the same seeded batch, takes its
    shard of it, and the gradients are summed with weights (those of the whole batch), so the
    run follows the single-process one up to floating-point summation order.
    """
    if dist is not None and settings.batch_size < dist.world_size:
        raise UsageError(
            f"--batch-size {settings.batch_size} cannot be split over {dist.world_size} ranks",
            f"use --batch-size >= {dist.world_size}",
        )
    model.to(device)
    n = len(data.train)
    per_epoch = data.train.num_batches(settings.batch_size)
    total = settings.total_steps(per_epoch, default_epochs=10)
    loop = _Loop(model, settings, regime, total, progress, dist)
    generator = torch.Generator().manual_seed(settings.seed)
    test = data.test.subset(settings.eval_samples, settings.seed)
    batches = _batches(n, settings.batch_size, generator)
    steps_done, stopped = 0, False
    for step in loop.progress.track(range(1, total + 1), total, "train-ode"):
        _, idx, last = next(batches)
        x = data.train.x[idx]
        if settings.augment and x.ndim == 4:
            x = augment_images(x, generator)  # before sharding: the generator stays in step
        y, share = data.train.y[idx], 1.0
        if dist is not None and dist.world_size > 1:
            part = dist.shard(len(idx))
            x, y, share = x[part.start : part.stop], y[part.start : part.stop], len(part) / len(idx)
        x, y = x.to(device), y.to(device)

        def loss_fn(x: Tensor = x, y: Tensor = y) -> Tensor:
            return F.cross_entropy(model(x), y)

        loop.step(loss_fn, step, share)
        steps_done = step
        if last or step == total:
            rec = loop.record(step, step / per_epoch, evaluate_classifier(model, test, device, dist=dist))
            if stop_when is not None and stop_when(rec):
                stopped = True
                break
    final = dict(loop.result.history[-1]) if loop.result.history else {}
    keep = ("test_accuracy", "test_loss", "train_loss")
    return loop.finish(steps_done, {k: final[k] for k in keep if k in final}, stopped)


def train_cnf(
    model: CNF,
    data: ToyData,
    settings: ODETrainSettings,
    regime: RegimeSettings,
    device: torch.device,
    *,
    progress: Progress | None = None,
    stop_when: StopRule | None = None,
) -> ODETrainResult:
    """Maximum-likelihood training of a CNF; test NLL before training and every ``eval_every``."""
    model.to(device)
    n = int(data.train.shape[0])
    per_epoch = (n + settings.batch_size - 1) // settings.batch_size
    if settings.iters is None and settings.epochs is None:
        total = 1000
    else:
        total = settings.total_steps(per_epoch, default_epochs=1)
    every = settings.eval_every or max(1, total // 10)
    loop = _Loop(model, settings, regime, total, progress)
    generator = torch.Generator().manual_seed(settings.seed)
    test = data.test[: settings.eval_samples] if settings.eval_samples else data.test
    batches = _batches(n, settings.batch_size, generator)
    loop.record(0, 0.0, evaluate_cnf(model, test, device))
    steps_done, stopped = 0, False
    for step in loop.progress.track(range(1, total + 1), total, "train-ode"):
        _, idx, _ = next(batches)
        x = data.train[idx].to(device)

        def nll(x: Tensor = x) -> Tensor:
            return -model.log_prob(x).mean()

        loop.step(nll, step)
        steps_done = step
        if step % every == 0 or step == total:
            rec = loop.record(step, step / per_epoch, evaluate_cnf(model, test, device))
            if stop_when is not None and stop_when(rec):
                stopped = True
                break
    final = loop.result.history[-1]
    metrics = {k: final[k] for k in ("test_nll", "bits_per_dim", "train_loss")}
    metrics["initial_test_nll"] = loop.result.history[0]["test_nll"]
    return loop.finish(steps_done, metrics, stopped)


def ode_checkpoint_meta(
    arch: str,
    args: dict[str, Any],
    *,
    num_classes: int | None,
    input_shape: list[int],
    normalization: dict[str, list[float]] | None,
    dataset: dict[str, Any],
    config: SolverConfig,
    regime: RegimeSettings,
    result: ODETrainResult,
    task: str,
    previous: ModelMeta | None = None,
    source_sha256: str | None = None,
) -> ModelMeta:
    """Checkpoint metadata: the builder args carry the training solver; extra says it plainly."""
    step = {
        "command": "train-ode",
        "task": task,
        "solver": config.to_dict(),
        "regime": regime.to_dict(),
        "iterations": result.iterations,
        "final_metrics": result.final_metrics,
    }
    return ModelMeta(
        arch=arch,
        args=args,
        num_classes=num_classes,
        input_shape=input_shape,
        normalization=normalization,
        dataset=dataset,
        history=[*(previous.history if previous else []), step],
        source_sha256=source_sha256,
        extra={
            "task": task,
            "training_solver": config.to_dict(),
            "training_nfe_per_solve": config.nfe_per_solve(),
            "training_regime": regime.to_dict(),
            **result.final_metrics,
        },
    )
