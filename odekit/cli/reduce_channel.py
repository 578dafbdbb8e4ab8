"""`odekit reduce --mode channel`: writing the student and reporting its channel groups."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from odekit.cli.finetune_report import history_table
from odekit.cli.runner import CommandContext, CommandOutput, ResultTable

if TYPE_CHECKING:  # loaded by the command body, so `--help` never imports torch
    import torch

    from odekit.io.model_meta import LoadedModel
    from odekit.methods.ron import RonRun
    from odekit.methods.ron.channel import ChannelResult


def speed_text(speedup: float) -> str:
    """'latency 1.80x faster', or 'latency 0.94x (slower than the teacher)': never a slow-down called faster."""
    if speedup >= 1.0:
        return f"latency {speedup:.2f}x faster"
    return f"latency {speedup:.2f}x (slower than the teacher)"


def channel_output(
    ctx: CommandContext,
    run: RonRun,
    loaded: LoadedModel,
    shape: tuple[int, ...],
    example: torch.Tensor,
    params: dict[str, Any],
) -> CommandOutput:
    """Write ``student.pt2`` (a torch.export program: the teacher's graph with fewer channels),
    read it back, and describe every channel group."""
    import torch

    from odekit.io.exported import load_exported, save_exported
    from odekit.methods.evaluation import model_cost
    from odekit.methods.ron.channel import ChannelResult

    result, compared = run.build, run.comparison
    assert isinstance(result, ChannelResult)
    path = ctx.path("student.pt2")
    step = {"command": "reduce", "mode": "channel", "widths": result.widths, "reconstruct": result.reconstruct,
            "target_flops": params.get("target_flops"), "test_accuracy": compared.student.accuracy}  # fmt: skip
    args = {
        "mode": "channel",
        "groups": [g.to_dict() for g in result.groups],
        "input_shape": list(shape),
    }
    meta = loaded.meta.derived("export", args, step, source=loaded.sha256)
    meta.extra = {
        "test_accuracy": compared.student.accuracy,
        "teacher_accuracy": compared.teacher.accuracy,
    }
    student = run.student
    save_exported(path, student.cpu(), shape, meta.to_json(), force=ctx.force)
    student.to(ctx.device)
    reloaded = load_exported(path)[0].to(ctx.device)
    archived = model_cost(reloaded, shape)
    with torch.no_grad():
        probe = example[:16].to(ctx.device)
        reload_diff = float((reloaded(probe) - student(probe)).abs().max())
    results: dict[str, Any] = {
        **compared.to_dict("reduce"),
        "mode": "channel",
        "reconstruct": result.reconstruct,
        "widths": result.widths,
        "groups": [g.to_dict() for g in result.groups],
        "budget": result.budget,
        "samples": result.n_samples,
        "finetune_history": run.history.epochs,
        "finetune": run.history.to_dict(),
        "reload_max_abs_diff": reload_diff,
        "archive_flops": archived.flops,
        "archive_params": archived.params,
        "student_checkpoint": str(path),
        "units": {
            "accuracy": "fraction in [0, 1]",
            "flops": "2 x multiply-adds per sample",
            "latency_ms": f"median ms per batch of {int(example.shape[0])} on {ctx.device}, teacher and student interleaved",
            "mean_kl": "nats, KL(teacher || student) averaged over the test split",
        },
    }
    reduced = sum(g.width < g.channels for g in result.groups)
    headline = [
        f"channel reduction of {reduced} of {len(result.groups)} channel groups ({result.reconstruct}): accuracy "
        f"{100 * compared.student.accuracy:.2f}% (teacher {100 * compared.teacher.accuracy:.2f}%, before fine-tuning "
        f"{100 * (compared.student_before or 0.0):.2f}%), agreement {100 * compared.agreement:.2f}%, "
        f"{compared.flop_reduction:.2f}x fewer FLOPs, {_param_text(compared)}, {speed_text(run.latency.speedup)}"
    ]
    if run.history.trained_epochs:
        headline.append(run.history.summary())
    blocked = [g for g in result.groups if not g.reducible]
    if blocked:
        headline.append(
            f"{len(blocked)} groups kept at full width (listed in the groups table with the reason)"
        )
    return CommandOutput(
        results=results, tables=[_groups_table(result), summary_table(run), history_table(run.history)], headline=headline
    )


def _param_text(compared: Any) -> str:
    t, s = compared.teacher.cost.params, compared.student.cost.params
    return f"{t / s:.2f}x fewer parameters" if s > 0 else "no parameters"


def _groups_table(result: ChannelResult) -> ResultTable:
    return ResultTable(
        "Channel groups (width: channels kept of C; energy: POD energy of the kept width)",
        ["group", "C", "width", "POD energy", "producers", "consumers", "kept because"],
        [
            [g.name, g.channels, g.width, g.pod_energy if g.pod_energy is not None else "-",
             len(g.producers), len(g.consumers), g.blocked or "-"]
            for g in result.groups
        ],
    )  # fmt: skip


def summary_table(run: RonRun) -> ResultTable:
    import statistics

    from odekit.cli.common import accuracy_text

    compared = run.comparison
    teacher_ms, student_ms = (
        statistics.median(t) for t in (run.latency.teacher_ms, run.latency.student_ms)
    )
    return ResultTable(
        "Teacher vs student (FLOPs = 2 x MACs per sample)",
        ["model", "accuracy [Wilson 95%] n", "FLOPs", "params", "latency ms"],
        [
            [
                name,
                accuracy_text(scored.accuracy, scored.n),
                scored.cost.flops,
                scored.cost.params,
                ms,
            ]
            for name, scored, ms in (
                ("teacher", compared.teacher, teacher_ms),
                ("student", compared.student, student_ms),
            )
        ],
    )
