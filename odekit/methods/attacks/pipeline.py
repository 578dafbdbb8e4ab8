"""One `odekit attack` run once its models are loaded: who generates the attack and who is
scored, the plan in the models' units, the experiment over seeds, and the files it writes.
The CLI parses options, loads checkpoints and data, calls these, and renders the results."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from odekit.errors import DataError, UsageError
from odekit.io.datasets import Dataset
from odekit.methods.attacks.base import ATTACKS, PerSampleAttack, UniversalAttack
from odekit.methods.attacks.experiments import (
    AttackRun,
    Scoring,
    combine_seeds,
    curve_csv,
    matrix_experiment,
    per_sample_experiment,
    sweep_plot,
    universal_experiment,
)
from odekit.methods.attacks.plan import AttackPlan, build_plan
from odekit.methods.attacks.solvers import SolverSpec, with_solver
from odekit.methods.attacks.space import BUDGET_UNITS, budget_scale, pixel_model

Specs = tuple[SolverSpec | None, SolverSpec | None]  # (--attack-solver, --eval-solver)

# report key of each output file, in the order the report lists them
RESULT_KEYS = {
    "perturbation.safetensors": "perturbation_path",
    "perturbations.safetensors": "perturbation_path",
    "attack.png": "figure_path",
    "matrix.png": "figure_path",
    "robust_accuracy.png": "curve_path",
    "curve.csv": "curve_csv_path",
    "fooling_rate.png": "curve_figure_path",
}


@dataclass
class Player:
    """A loaded model in pixel space with its data."""

    label: str
    path: Path
    sha256: str
    model: nn.Module
    data: Dataset

    @classmethod
    def from_loaded(cls, path: Path, sha256: str, model: nn.Module, data: Dataset) -> Player:
        """Wrap a model that takes normalised inputs so that it takes [0, 1] pixels."""
        return cls(path.stem, path, sha256, pixel_model(model, data), data)


def same_inputs(players: list[Player]) -> None:
    """Transfer needs models of one input shape and one data set (`DataError` otherwise)."""
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
                "transfer needs models of the same data set (or pass `data`)",
            )


@dataclass(frozen=True)
class Roles:
    """The scored model, the model that generates the attack (itself unless --source) and the
    solvers each integrates with."""

    target: Player
    source: Player | None
    specs: Specs

    @property
    def generator(self) -> Player:
        return self.source or self.target

    @property
    def mode(self) -> str:
        if self.source is not None:
            return "black-box transfer"
        if self.specs != (None, None) and str(self.specs[0]) != str(self.specs[1]):
            return "grey-box (solver transfer)"
        return "white-box"

    def models(self) -> tuple[nn.Module, nn.Module]:
        return (with_solver(self.generator.model, self.specs[0], "`attack_solver`"),
                with_solver(self.target.model, self.specs[1], "`eval_solver`"))  # fmt: skip

    def scoring(self, base: Scoring, seed: int) -> Scoring:
        transfer = self.source is not None or self.specs != (None, None)
        return replace(base, seed=seed, transfer=transfer, mode=self.mode)


def parse_units(text: str, budget_given: bool) -> str:
    """--units: 'pixel' or 'model'; model units need the budget spelled out."""
    unit = text.strip().lower()
    if unit not in BUDGET_UNITS:
        raise UsageError(f"unknown budget units '{text}'", f"choose one of: {', '.join(BUDGET_UNITS)}")
    if unit == "model" and not budget_given:
        raise UsageError("`units` model needs an explicit budget", "give `delta` (universal) or `eps` (per-sample)")
    return unit


def splits_over_ranks(method: str, matrix: bool) -> bool:
    """Whether a torchrun launch of this run shards its work (issue 15): single-model runs of
    active-subspace, random and every per-sample attack; every other run refuses."""
    return not matrix and method in ATTACKS and ATTACKS.get(method).supports_distributed


def drop_unused_params(params: dict[str, Any], plan: AttackPlan, options: Mapping[str, Any]) -> None:
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


def output_names(plan: AttackPlan, matrix: bool) -> list[str]:
    """The files a run writes, known before any model is loaded (so --out is claimed first)."""
    sweep = len(plan.budgets) > 1
    if matrix:
        return ["matrix.png"]
    if plan.universal:
        return ["perturbation.safetensors", "attack.png", *(["curve.csv", "fooling_rate.png"] if sweep else [])]
    return ["perturbations.safetensors", "attack.png", "robust_accuracy.png", *(["curve.csv"] if sweep else [])]


def resolve_plan(
    method: str, options: Mapping[str, Any], base: AttackPlan, unit: str, players: list[Player]
) -> AttackPlan:
    """The plan with budgets in pixels, once the models' normalisation is known; every budget
    and --target checked against every model."""
    final = build_plan(method, options, budget_scale([p.data for p in players])) if unit == "model" else base
    budget_option = f"`{base.attack.budget_name}`"
    target = options.get("target")
    for p in players:
        final.attack.distance.check_budgets(final.budgets, p.data.input_shape, budget_option)
        if target is not None and target >= p.data.num_classes:
            raise UsageError(f"`target` {target} is not a class of '{p.path}' "
                             f"({p.data.num_classes} classes)",
                             f"give a class in [0, {p.data.num_classes - 1}]")  # fmt: skip
    return final


def resolved_params(plan: AttackPlan, unit: str) -> dict[str, Any]:
    """What the report's params record as actually used: method, pixel budgets, settings."""
    return {"method": plan.method, "budgets": plan.budgets, "budget_units": unit, **asdict(plan.attack.settings)}


def over_seeds(seeds: list[int], experiment: Callable[[int], AttackRun]) -> AttackRun:
    """The first seed's run, with mean and spread over all seeds added to its report."""
    runs = [experiment(seed) for seed in seeds]
    if len(seeds) > 1:
        runs[0].report = replace(runs[0].report, seeds=combine_seeds(runs, seeds))
    return runs[0]


def run_single(
    plan: AttackPlan, roles: Roles, seeds: list[int], base: Scoring, fit_samples: int, eval_samples: int | None
) -> AttackRun:
    """Attack one target (generated on ``roles.generator``) once per seed."""
    attack = plan.attack
    gen = roles.generator
    with solver_memory_guard(roles.specs):
        attack_model, eval_model = roles.models()
        if isinstance(attack, UniversalAttack):
            provenance = {"model_sha256": gen.sha256, "model_path": str(gen.path),
                          "target_sha256": roles.target.sha256}  # fmt: skip
            return over_seeds(seeds, lambda seed: universal_experiment(
                attack, attack_model, eval_model, gen.data, roles.target.data, roles.scoring(base, seed),
                fit_samples=fit_samples, eval_samples=eval_samples, provenance=provenance,
                budgets=plan.budgets,
            ))  # fmt: skip
        assert isinstance(attack, PerSampleAttack)
        provenance = {"model_sha256": gen.sha256, "target_sha256": roles.target.sha256}
        return over_seeds(seeds, lambda seed: per_sample_experiment(
            attack, plan.budgets, attack_model, eval_model, roles.target.data, roles.scoring(base, seed),
            eval_samples=eval_samples, provenance=provenance,
        ))  # fmt: skip


def run_matrix(
    plan: AttackPlan, players: list[Player], specs: Specs, base: Scoring, fit_samples: int,
    eval_samples: int | None,
) -> AttackRun:  # fmt: skip
    """Every player generates, every player is scored (rows: sources, columns: targets)."""
    if len(plan.budgets) != 1:
        raise UsageError("`matrix` takes one budget", f"give a single `{plan.attack.budget_name}` value")
    same_inputs(players)
    attack = plan.attack
    assert isinstance(attack, UniversalAttack | PerSampleAttack)
    with solver_memory_guard(specs):
        return matrix_experiment(
            attack,
            plan.budgets[0],
            [(p.label, with_solver(p.model, specs[0], "`attack_solver`")) for p in players],
            [(p.label, with_solver(p.model, specs[1], "`eval_solver`")) for p in players],
            players[0].data,
            base,
            fit_samples=fit_samples,
            eval_samples=eval_samples,
        )


def record_units(run: AttackRun, unit: str, base: AttackPlan) -> None:
    """delta/eps in the report are always pixel units; record what the user typed and how."""
    given: float | list[float] | None = None
    if unit == "model":  # needs explicit budgets, so the unscaled plan holds them as typed
        given = base.budgets[0] if base.universal and len(base.budgets) == 1 else base.budgets
    run.report = replace(run.report, budget_units=unit, budget_given=given)


def save_run(run: AttackRun, paths: dict[str, Path], plan: AttackPlan, force: bool) -> None:
    """Write the run's files to ``paths`` (from `output_names`) and name them in its report."""
    from odekit.writers.atomic import atomic_write_text
    from odekit.writers.plots import save_figure

    run.report = replace(run.report, files={RESULT_KEYS[name]: str(path) for name, path in paths.items()})
    for name in ("perturbation.safetensors", "perturbations.safetensors"):
        if name in paths:
            write_tensors(paths[name], run.tensors, run.metadata, force)
    if "curve.csv" in paths:
        atomic_write_text(paths["curve.csv"], curve_csv(run.report), force)
    if "fooling_rate.png" in paths:
        run.figures["fooling_rate.png"] = sweep_plot(run.report, plan.attack.distance)
    for name, figure in run.figures.items():
        save_figure(figure, paths[name], force)


def write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, Any], force: bool) -> None:
    """A safetensors file of float32 CPU tensors, with ``metadata`` as JSON (atomic)."""
    from odekit.writers.tensor_file import write_safetensors

    state = {k: v.detach().cpu().float().clone().contiguous() for k, v in tensors.items()}
    meta = {"odekit_attack": json.dumps(metadata, sort_keys=True), "format": "pt"}
    write_safetensors(path, state, meta, force)


def _is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and (
        "can't allocate memory" in str(exc) or "out of memory" in str(exc).lower()
    )


@contextlib.contextmanager
def solver_memory_guard(specs: Specs) -> Iterator[None]:
    """An out-of-memory while integrating with a fixed-step solver given on the command line is
    blamed on its step count (memory for the gradient grows with steps x batch), not on
    --batch-size alone."""
    try:
        yield
    except BaseException as exc:
        given = [(role, spec) for role, spec in zip(("`attack_solver`", "`eval_solver`"), specs,
                                                      strict=True) if spec is not None]  # fmt: skip
        if not given or not _is_out_of_memory(exc):
            raise
        named = ", ".join(f"{role} {spec}" for role, spec in given)
        raise UsageError(
            f"out of memory while running the ODE blocks with {named}",
            "every solver step keeps its states for the gradient: lower the step count "
            "(or `batch_size`, `fit_samples`, `eval_samples`)",
        ) from exc
