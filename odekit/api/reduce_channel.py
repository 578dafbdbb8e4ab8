"""The channel-mode part of `odekit.reduce`: report entries, tables and headline of a student that
is the teacher's graph with fewer channels (written as a ``.pt2`` program, and as safetensors +
metadata when the teacher's architecture is registered: `registered_meta`)."""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

import torch
from torch import nn

from odekit.io.model_meta import LoadedModel, ModelMeta
from odekit.methods.ron import RonRun
from odekit.methods.ron.channel import ChannelResult
from odekit.models.narrow import CHANNEL_ARCH, narrowed_shapes
from odekit.models.registry import arch_names, build_model
from odekit.stats import accuracy_text
from odekit.writers.tables import ReportTable

REBUILD_TOLERANCE = 1e-4  # largest logit difference, relative to the logits' size, of a rebuilt student


def speed_text(speedup: float) -> str:
    """'latency 1.80x faster', or 'latency 0.94x (slower than the teacher)': never a slow-down called faster."""
    if speedup >= 1.0:
        return f"latency {speedup:.2f}x faster"
    return f"latency {speedup:.2f}x (slower than the teacher)"


def channel_report(
    run: RonRun, loaded: LoadedModel, shape: tuple[int, ...], target_flops: Any
) -> tuple[dict[str, Any], list[ReportTable], list[str], ModelMeta]:
    """report.json entries, tables, headline and the student's metadata (its history step)."""
    result, compared = run.build, run.comparison
    assert isinstance(result, ChannelResult)
    step = {"command": "reduce", "mode": "channel", "widths": result.widths, "reconstruct": result.reconstruct,
            "target_flops": target_flops, "kept_epoch": run.history.best_epoch,
            "test_accuracy": compared.student.accuracy}  # fmt: skip
    args = {"mode": "channel", "groups": [g.to_dict() for g in result.groups], "input_shape": list(shape)}
    meta = loaded.meta.derived("export", args, step, source=loaded.sha256)
    meta.extra = {"test_accuracy": compared.student.accuracy, "teacher_accuracy": compared.teacher.accuracy}
    results: dict[str, Any] = {
        **compared.to_dict("reduce"),
        "mode": "channel",
        "reconstruct": result.reconstruct,
        "widths": result.widths,
        "groups": [g.to_dict() for g in result.groups],
        "budget": result.budget,
        "samples": result.n_samples,
        "distributed": result.distributed,
    }
    reduced = sum(g.width < g.channels for g in result.groups)
    headline = [
        f"channel reduction of {reduced} of {len(result.groups)} channel groups ({result.reconstruct}): accuracy "
        f"{100 * compared.student.accuracy:.2f}% (teacher {100 * compared.teacher.accuracy:.2f}%, before fine-tuning "
        f"{100 * (compared.student_before or 0.0):.2f}%), agreement {100 * compared.agreement:.2f}%, "
        f"{compared.flop_reduction:.2f}x fewer FLOPs, {_param_text(compared)}, {speed_text(run.latency.speedup)}"
    ]
    blocked = [g for g in result.groups if not g.reducible]
    if blocked:
        headline.append(f"{len(blocked)} groups kept at full width (listed in the groups table with the reason)")
    candidates = result.budget.get("candidates") or []
    if len(candidates) > 1:
        headline.append(allocation_text(candidates))
    return results, [groups_table(result), summary_table(run)], headline, meta


def allocation_text(candidates: list[dict[str, Any]]) -> str:
    """'widths: uniform (validation mean KL 0.0538; greedy 0.0712)'."""
    chosen = next(c for c in candidates if c["chosen"])
    others = "; ".join(f"{c['allocation']} {c['validation_mean_kl']:.4f}" for c in candidates if not c["chosen"])
    return f"widths: {chosen['allocation']} (validation mean KL {chosen['validation_mean_kl']:.4f}; {others})"


def registered_meta(student: nn.Module, loaded: LoadedModel, meta: ModelMeta, probe: torch.Tensor) -> ModelMeta | None:
    """The student's metadata as the teacher's registered architecture narrowed to the student's
    shapes (`CHANNEL_ARCH`: `odekit.load` rebuilds it from safetensors), or None when the teacher's
    architecture is not registered or that rebuild does not compute the student on ``probe`` (a
    trace that renamed or dropped modules, a forward with hard-coded widths)."""
    arch, args = loaded.meta.arch, loaded.meta.args
    if arch not in arch_names():
        return None
    if arch == CHANNEL_ARCH:  # a channel student of a channel student: narrow the first teacher
        arch, args = str(args.get("arch")), dict(args.get("args") or {})
    state = student.state_dict()
    try:
        shapes = narrowed_shapes(build_model(arch, args), state)
        derived_args = {"arch": arch, "args": args, "shapes": shapes}
        rebuilt = build_model(CHANNEL_ARCH, derived_args)
        rebuilt.load_state_dict(state, strict=True)
        rebuilt.to(probe.device).eval()
        with torch.no_grad():
            expected = student(probe)
            diff = float((rebuilt(probe) - expected).abs().max())
    except Exception:  # any failure to rebuild means: write the .pt2 program only
        return None
    if not diff <= REBUILD_TOLERANCE * max(1.0, float(expected.abs().max())):
        return None
    return dataclasses.replace(
        meta, arch=CHANNEL_ARCH, args=derived_args, input_shape=meta.input_shape or meta.args.get("input_shape"),
        extra={**meta.extra, "groups": meta.args.get("groups", [])},
    )  # fmt: skip


def _param_text(compared: Any) -> str:
    t, s = compared.teacher.cost.params, compared.student.cost.params
    return f"{t / s:.2f}x fewer parameters" if s > 0 else "no parameters"


def groups_table(result: ChannelResult) -> ReportTable:
    return ReportTable(
        "Channel groups (width: channels kept of C; energy: POD energy of the kept width)",
        ["group", "C", "width", "POD energy", "producers", "consumers", "kept because"],
        [
            [g.name, g.channels, g.width, g.pod_energy if g.pod_energy is not None else "-",
             len(g.producers), len(g.consumers), g.blocked or "-"]
            for g in result.groups
        ],
    )  # fmt: skip


def summary_table(run: RonRun) -> ReportTable:
    """Teacher vs student: accuracy with its Wilson interval, FLOPs, params, median latency."""
    compared = run.comparison
    teacher_ms, student_ms = (statistics.median(t) for t in (run.latency.teacher_ms, run.latency.student_ms))
    return ReportTable(
        "Teacher vs student (FLOPs = 2 x MACs per sample)",
        ["model", "accuracy [Wilson 95%] n", "FLOPs", "params", "latency ms"],
        [
            [name, accuracy_text(scored.accuracy, scored.n), scored.cost.flops, scored.cost.params, ms]
            for name, scored, ms in (("teacher", compared.teacher, teacher_ms), ("student", compared.student, student_ms))
        ],
    )  # fmt: skip


def archive_cost(archive: torch.nn.Module, input_shape: tuple[int, ...]) -> dict[str, int]:
    """FLOPs and parameters of the written ``.pt2`` archive, as read back (they must equal the student's)."""
    from odekit.methods.evaluation import model_cost

    cost = model_cost(archive, input_shape)
    return {"archive_flops": cost.flops, "archive_params": cost.params}
