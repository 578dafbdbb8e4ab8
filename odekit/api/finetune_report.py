"""The fine-tuning part of reduce and asnet reports: per-epoch table, plot and one summary line."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from odekit.writers.tables import ReportTable

if TYPE_CHECKING:  # torch loads with the command body, not with `--help`
    from odekit.methods.training import TrainHistory

FINETUNE_PLOT = "finetune_history.png"


def history_table(history: TrainHistory) -> ReportTable:
    """One row per epoch (0: before fine-tuning); the kept epoch is marked."""
    rows = [
        [int(e["epoch"]), e.get("loss", "-"), e.get("val_accuracy", "-"), e.get("val_agreement", "-"),
         e.get("val_kl", "-"), e.get("test_accuracy", "-"), "kept" if e["epoch"] == history.best_epoch else ""]
        for e in history.epochs
    ]  # fmt: skip
    return ReportTable(
        f"Fine-tuning per epoch ({history.validation_samples} validation samples held out of the training split; "
        f"epoch 0 = untuned): {history.summary()}",
        ["epoch", "train loss", "val accuracy", "val agreement", "val KL", "test accuracy", "model"],
        rows,
    )


def history_figure(history: TrainHistory, title: str) -> Any:
    """Training loss (left) and validation accuracy/agreement (right) per epoch; the kept epoch dashed."""
    from odekit.writers.plots import new_figure

    fig, axes = new_figure(2, 1, (4.6, 3.6))
    loss_ax, val_ax = axes[0]
    trained = [e for e in history.epochs if "loss" in e]
    loss_ax.plot([e["epoch"] for e in trained], [e["loss"] for e in trained], "o-")
    loss_ax.set_xlabel("epoch")
    loss_ax.set_ylabel("training loss")
    loss_ax.set_yscale("log")
    for key, label in (("val_accuracy", "validation accuracy"), ("val_agreement", "agreement with the teacher"),
                       ("test_accuracy", "test accuracy (not used to choose)")):  # fmt: skip
        points = [(e["epoch"], e[key]) for e in history.epochs if key in e]
        if points:
            val_ax.plot(*zip(*points, strict=True), "o-", label=label)
    if history.best_epoch is not None:
        val_ax.axvline(history.best_epoch, linestyle="--", color="gray", label=f"kept: epoch {history.best_epoch}")
    val_ax.set_xlabel("epoch (0: untuned)")
    val_ax.set_ylabel("fraction")
    val_ax.legend(fontsize=7)
    for ax in (loss_ax, val_ax):
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return fig
