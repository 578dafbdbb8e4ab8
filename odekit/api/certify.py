"""`odekit.certify`: l2 Lipschitz bounds per layer and for the network, certified radii and
accuracy beside the attacks' robust accuracy; a student beside its teacher with ``compare``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from odekit.api.defaults import STREAM_BATCH_SIZE
from odekit.api.inputs import ModelLike, as_dataset, as_loaded
from odekit.api.progress import shown
from odekit.api.results import Claim, RunResult
from odekit.device import resolve_device
from odekit.errors import UsageError
from odekit.io.datasets import Dataset
from odekit.methods.certify.certificate import CertifySettings
from odekit.methods.certify.run import ModelCertificate, certify_model, comparison
from odekit.progress import Progress
from odekit.writers.tables import ReportTable

DEFAULT_BUDGETS = (0.01, 0.02, 0.05, 0.1, 0.25, 0.5)  # l2, [0, 1]-pixel units


@dataclass(frozen=True)
class CertifyResult(RunResult):
    """The certificate of the model (``.certificates["model"]``, or ``"student"`` and ``"teacher"``
    with ``compare``); `save` also writes certify.png and layers.png."""

    certificates: dict[str, ModelCertificate] = field(default_factory=dict)

    @property
    def lipschitz_upper(self) -> float:
        return float(self.results["lipschitz_upper"])

    def write_outputs(self, claim: Claim, force: bool) -> dict[str, Any]:
        plot, layers = claim("certify.png"), claim("layers.png")
        _plot(plot, self.certificates, force)
        _layers_plot(layers, self.certificates, force)
        return {"plot": str(plot), "layers_plot": str(layers)}


def certify(
    model: ModelLike,
    data: Any = None,
    *,
    compare: ModelLike | None = None,
    eps: Sequence[float] = DEFAULT_BUDGETS,
    layers: str | None = None,
    iters: int = 6,
    power_iters: int = 30,
    attack: bool = True,
    pgd_steps: int = 20,
    eval_samples: int | None = None,
    batch_size: int = STREAM_BATCH_SIZE,
    test: Any = None,
    device: str = "auto",
    seed: int = 0,
    progress: bool | Progress | None = None,
) -> CertifyResult:
    """Certified l2 robustness of ``model`` (a module or a path) on ``data``'s test split, beside
    DeepFool/PGD robust accuracy (``attack``); ``compare``: its teacher, certified on the same
    samples. Returns a `CertifyResult` (``.lipschitz_upper``, ``.to_dict()``, ``.save(folder)``)."""
    loaded = as_loaded(model)
    teacher = as_loaded(compare).model if compare is not None else None
    dataset = as_dataset(data, loaded, test=test)
    settings = CertifySettings(tuple(float(e) for e in eps), "2", iters, power_iters, pgd_steps, attack=attack,
                               batch_size=batch_size, layers=layers)  # fmt: skip
    params = {"norm": "2", "eps": ",".join(f"{e:g}" for e in eps), "layers": layers, "iters": iters,
              "power_iters": power_iters, "attack": attack, "pgd_steps": pgd_steps, "samples": eval_samples,
              "data": data if isinstance(data, str | type(None)) else None, "batch_size": batch_size, "seed": seed}  # fmt: skip
    with shown(progress) as bars:
        return run_certify(loaded.model, dataset, settings, resolve_device(device), teacher=teacher,
                           names=(loaded.path.name, Path(str(compare)).name if compare is not None else "teacher"),
                           samples=eval_samples, seed=seed, params=params, inputs={"data": dataset.describe()},
                           progress=bars)  # fmt: skip


def run_certify(
    model: torch.nn.Module,
    dataset: Dataset,
    settings: CertifySettings,
    device: torch.device,
    *,
    teacher: torch.nn.Module | None,
    names: tuple[str, str],
    samples: int | None,
    seed: int,
    params: dict[str, Any],
    inputs: dict[str, Any],
    progress: Progress | None = None,
) -> CertifyResult:
    """Bounds, certificate and (with ``teacher``) the side-by-side comparison (the CLI and
    `certify` share this)."""
    test = dataset.test.subset(samples, seed)
    x, y = test.x.to(device), test.y.to(device)
    key = "student" if teacher is not None else "model"
    runs = {key: certify_model(model, dataset, x, y, settings, seed=seed, progress=progress)}
    if teacher is not None:
        runs["teacher"] = certify_model(teacher, dataset, x, y, settings, seed=seed, progress=progress)
    main = runs[key]
    results: dict[str, Any] = main.to_dict()
    tables = _tables(main, names[0])
    headline = [_headline(names[0], main)]
    if teacher is not None:
        results["teacher"] = runs["teacher"].to_dict()
        results["comparison"] = comparison(runs["student"], runs["teacher"])
        tables = [_compare_table(results["comparison"]), *tables, *_tables(runs["teacher"], names[1])]
        headline.append(_headline(names[1], runs["teacher"]))
    return CertifyResult(command="certify", results=results, inputs=inputs, params=params, tables=tables,
                         headline=headline, device=str(device), certificates=runs)  # fmt: skip


def check_teacher_shape(teacher_shape: Sequence[int] | None, data_shape: Sequence[int]) -> None:
    """A teacher must take the student's inputs."""
    if teacher_shape and list(teacher_shape) != list(data_shape):
        raise UsageError(f"the teacher takes inputs of shape {list(teacher_shape)}, the student {list(data_shape)}",
                         "compare a student with its own teacher")  # fmt: skip


def _plot(path: Path, runs: dict[str, ModelCertificate], force: bool) -> None:
    """Certified (solid) and robust-under-attack (dashed) accuracy against the l2 budget."""
    from odekit.writers.plots import new_figure, save_figure

    fig, axes = new_figure(1, 1, (6.0, 4.2))
    ax = axes[0][0]
    for (label, run), color in zip(runs.items(), ("tab:blue", "tab:orange"), strict=False):
        rows = run.certificate.rows
        eps = [0.0, *[r.eps for r in rows]]
        clean = run.certificate.clean.rate
        ax.plot(eps, [clean, *[r.certified.rate for r in rows]], "o-", color=color, label=f"{label}: certified")
        if all(r.robust is not None for r in rows):
            ax.plot(eps, [clean, *[r.robust.rate for r in rows if r.robust is not None]], "s--", color=color,
                    label=f"{label}: under attack (DeepFool + PGD)")  # fmt: skip
    ax.set_xlabel("l2 budget ([0, 1] pixels)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"certified vs empirical robust accuracy, n = {len(next(iter(runs.values())).certificate.radii.correct)}",
                 fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, force)


def _layers_plot(path: Path, runs: dict[str, ModelCertificate], force: bool) -> None:
    """Per compute layer: [lower, upper] of its spectral norm (log scale)."""
    from odekit.writers.plots import new_figure, save_figure

    fig, axes = new_figure(1, 1, (7.0, 4.0))
    ax = axes[0][0]
    for (label, run), (color, shift) in zip(runs.items(), (("tab:blue", -0.15), ("tab:orange", 0.15)), strict=False):
        layers = [layer for layer in run.network.layers if layer.index is not None]
        xs = [layer.index + shift for layer in layers if layer.index is not None]
        ax.vlines(xs, [layer.bound.lower for layer in layers], [layer.bound.upper for layer in layers], color=color, lw=3)
        ax.plot(xs, [layer.bound.upper for layer in layers], "v", color=color, label=f"{label}: upper (Gram / SVD)")
        ax.plot(xs, [layer.bound.lower for layer in layers], "^", color=color, mfc="none", label=f"{label}: lower (power it.)")
    ax.set_yscale("log")
    ax.set_xlabel("compute layer (conv/linear, BatchNorm folded)")
    ax.set_ylabel("spectral norm")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    save_figure(fig, path, force)


def _tables(run: ModelCertificate, name: str) -> list[ReportTable]:
    rows: list[list[Any]] = []
    for layer in run.network.layers:
        if layer.kind in ("conv", "linear") or layer.bound.upper != 1.0:
            rows.append([layer.index if layer.index is not None else "", layer.name, layer.kind, layer.bound.lower,
                         layer.bound.upper, layer.note or layer.bound.method])  # fmt: skip
    layer_table = ReportTable(f"{name}: layer bounds (l2 spectral norm)", ["#", "layer", "kind", "lower", "upper", "how"], rows)
    budget_rows = [[r.eps, r.certified.describe(), r.robust.describe() if r.robust else "-", r.clean.describe(),
                    r.violations] for r in run.certificate.rows]  # fmt: skip
    budgets = ReportTable(f"{name}: accuracy per l2 budget (pixel units)",
                          ["eps", "certified", "under attack", "clean", "violations"], budget_rows)  # fmt: skip
    return [layer_table, budgets]


def _compare_table(comparison: dict[str, Any]) -> ReportTable:
    rows = [[r["metric"], r["teacher"], r["student"], r["change"], r.get("ratio", "")] for r in comparison["rows"]]
    return ReportTable("student vs teacher", ["metric", "teacher", "student", "change", "ratio"], rows)


def _headline(name: str, run: ModelCertificate) -> str:
    cert = run.certificate
    d = cert.to_dict()
    ratio = d["radius_ratio_empirical_over_certified"]
    loose = f"; empirical / certified radius: median {ratio['median']:.3g}" if ratio else ""
    dropped = f" (margins read before the final {run.network.dropped_output_op})" if run.network.dropped_output_op else ""
    return (f"{name}: L <= {cert.lipschitz_upper:.4g} (model inputs), {cert.lipschitz_pixel:.4g} (pixels); local lower "
            f"bound {cert.radii.local_lower:.4g}{dropped}; clean {cert.clean.describe()}; median certified radius "
            f"{d['median_certified_radius']:.3g}{loose}")  # fmt: skip
