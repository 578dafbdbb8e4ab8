"""`odekit.attack`: universal perturbations and per-sample attacks of a model, as one call."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from odekit.api.attack_render import render
from odekit.api.defaults import STREAM_BATCH_SIZE
from odekit.api.inputs import ModelLike, as_dataset, as_loaded
from odekit.api.progress import shown
from odekit.api.results import Claim, RunResult
from odekit.device import resolve_device, seed_everything
from odekit.errors import UsageError
from odekit.methods.attacks import pipeline
from odekit.methods.attacks.experiments import AttackRun, Scoring
from odekit.methods.attacks.plan import AttackPlan, build_plan, parse_budgets
from odekit.progress import Progress

# the API's names of attack settings whose field reads differently (the CLI's flags, underscored)
SETTING_FIELDS = {"iters": "steps", "max_iters": "max_iter"}
DEFAULT_FIT_SAMPLES = 200


@dataclass(frozen=True)
class AttackResult(RunResult):
    """A finished attack: ``.perturbation`` (universal attacks: the vector, in [0, 1] pixel units,
    at the largest budget), ``.fooling_rate`` and the full measurements in ``.to_dict()``."""

    run: AttackRun | None = None
    plan: AttackPlan | None = None
    matrix: bool = False

    @property
    def perturbation(self) -> torch.Tensor | None:
        """Universal attacks: the vector at the largest budget, in [0, 1] pixels (a sweep's
        vector per budget: ``perturbations``). Per-sample attacks: the perturbations of the
        test inputs at the largest budget."""
        tensors = self.perturbations
        return tensors[-1] if tensors else None

    @property
    def perturbations(self) -> list[torch.Tensor]:
        """One tensor per budget, smallest budget first (pixel units)."""
        tensors = self.run.tensors if self.run is not None else {}
        if "perturbation_pixel" in tensors:
            sweep = [tensors[f"perturbation_pixel_{i}"] for i in range(len(tensors)) if f"perturbation_pixel_{i}" in tensors]
            return sweep or [tensors["perturbation_pixel"]]
        return [tensors[f"eps_{i}"] for i in range(len(tensors)) if f"eps_{i}" in tensors]

    @property
    def fooling_rate(self) -> float | list[float] | None:
        """Test fooling rate (universal; one per budget of a sweep) or None."""
        value = self.results.get("fooling_rate_test")
        return value if isinstance(value, float | list) else None

    def write_outputs(self, claim: Claim, force: bool) -> dict[str, Any]:
        """perturbation(s).safetensors, attack.png and the sweep's curve files."""
        assert self.run is not None and self.plan is not None
        paths = {name: claim(name) for name in pipeline.output_names(self.plan, self.matrix)}
        pipeline.save_run(self.run, paths, self.plan, force)
        return dict(self.run.report.files)


def attack(
    model: ModelLike,
    data: Any = None,
    *,
    method: str = "active-subspace",
    delta: float | str | Sequence[float] | None = None,
    eps: float | str | Sequence[float] | None = None,
    norm: str = "2",
    target: int | None = None,
    fit_samples: int = DEFAULT_FIT_SAMPLES,
    eval_samples: int | None = None,
    seeds: Sequence[int] | None = None,
    units: str = "pixel",
    source: ModelLike | None = None,
    batch_size: int = STREAM_BATCH_SIZE,
    test: Any = None,
    normalization: tuple[list[float], list[float]] | None = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool | Progress | None = None,
    **settings: Any,
) -> AttackResult:
    """Attack ``model`` with ``method`` (universal: ``delta``, the norm of the vector in [0, 1]
    pixel units [3.0 for l2]; per-sample: ``eps``). ``source``: generate on this model, score on
    ``model`` (transfer). ``settings``: the method's own (``max_iters``, ``k``, ``max_passes``,
    ``iters``, ``restarts``...). Returns an `AttackResult`."""
    options = {**{SETTING_FIELDS.get(k, k): v for k, v in settings.items()}, "norm": norm, "target": target,
               "delta": _budgets(delta, "delta"), "eps": _budgets(eps, "eps")}  # fmt: skip
    unit = pipeline.parse_units(units, budget_given=delta is not None or eps is not None)
    base_plan = build_plan(method, options)  # validates the options before any model is touched
    tgt = _player(model, data, test, normalization, "checkpoint")
    src = _player(source, data, test, normalization, "source") if source is not None else None
    seed_list = list(seeds) if seeds is not None else [seed]
    params = {"method": method, "norm": norm, "delta": options["delta"], "eps": options["eps"], "target": target,
              "fit_samples": fit_samples, "eval_samples": eval_samples, "units": units, "seeds": seeds,
              "batch_size": batch_size, "seed": seed, **settings}  # fmt: skip
    pipeline.drop_unused_params(params, base_plan, options)
    dev = resolve_device(device)
    seed_everything(seed)
    with shown(progress) as bars:
        score = Scoring(seed=seed, batch_size=batch_size, device=dev, progress=bars)
        return run_attack(method, options, base_plan, unit, [tgt] if src is None else [tgt, src], score=score,
                          seeds=seed_list, fit_samples=fit_samples, eval_samples=eval_samples, params=params,
                          inputs=_inputs(tgt, src))  # fmt: skip


def _budgets(value: float | str | Sequence[float] | None, what: str) -> list[float] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return parse_budgets(value, f"`{what}`")
    values = [float(value)] if isinstance(value, int | float) else [float(v) for v in value]
    return parse_budgets(",".join(repr(v) for v in values), f"`{what}`")


def _player(model: ModelLike, data: Any, test: Any, normalization: Any, key: str) -> pipeline.Player:
    loaded = as_loaded(model)
    dataset = as_dataset(data, loaded, test=test, normalization=normalization)
    return pipeline.Player.from_loaded(loaded.path, loaded.sha256, loaded.model, dataset)


def _inputs(target: pipeline.Player, source: pipeline.Player | None) -> dict[str, Any]:
    inputs = {"checkpoint": {"path": str(target.path), "sha256": target.sha256}, "data": target.data.describe()}
    if source is not None:
        inputs["source"] = {"path": str(source.path), "sha256": source.sha256}
    return inputs


def run_attack(
    method: str,
    options: dict[str, Any],
    base_plan: AttackPlan,
    unit: str,
    players: list[pipeline.Player],
    *,
    score: Scoring,
    seeds: list[int],
    fit_samples: int,
    eval_samples: int | None,
    params: dict[str, Any],
    inputs: dict[str, Any],
    matrix: bool = False,
    specs: pipeline.Specs = (None, None),
) -> AttackResult:
    """One attack run once the models are loaded (the CLI and `attack` share this): ``players``
    is [target] or [target, source], or every model of a transfer ``matrix``."""
    if len(players) > 1:
        pipeline.same_inputs(players)
    plan = pipeline.resolve_plan(method, options, base_plan, unit, players)
    params["resolved"] = pipeline.resolved_params(plan, unit)
    if matrix:
        run = pipeline.run_matrix(plan, players, specs, score, fit_samples, eval_samples)
    else:
        if len(players) > 2:
            raise UsageError(f"got {len(players)} models", "attack one model, or pass `matrix` for a transfer matrix")
        roles = pipeline.Roles(players[0], players[1] if len(players) > 1 else None, specs)
        run = pipeline.run_single(plan, roles, seeds, score, fit_samples, eval_samples)
    pipeline.record_units(run, unit, base_plan)
    tables, headline = render(plan, run.report)
    return AttackResult(command="attack", results=run.report.to_dict(), inputs=inputs, params=params, tables=tables,
                        headline=headline, device=str(score.device), run=run, plan=plan, matrix=matrix)  # fmt: skip
