"""Figures of `odekit asnet`: the active-subspace spectrum and the baselines (thesis fig. 6.5)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # matplotlib and torch load with the figure, not with `--help`
    from odekit.methods.asnet import LayerAnalysis


def spectrum_figure(analyses: list[LayerAnalysis], eps: float, used: tuple[int, int] | None = None) -> Any:
    """Thesis fig. 6.5a: each layer's gradient spectrum, its active neurons (dots) and, for
    ``used = (cut layer, r)``, the rank the ASNet really uses (x)."""
    from odekit.writers.plots import new_figure

    fig, axes = new_figure(1, 1, (6.5, 4.2))
    ax = axes[0][0]
    for a in analyses:
        s = a.subspace.singular_values[:200].double()
        s = s[s > 0]
        if s.numel() == 0:
            continue
        k = a.subspace.active_neurons(eps)
        ax.semilogy(range(1, s.numel() + 1), (s / s[0]).numpy(), label=f"layer {a.cut.index} (n={a.cut.features}, active {k})")
        if k <= s.numel():
            ax.plot([k], [float(s[k - 1] / s[0])], "o", color=ax.lines[-1].get_color())
        r = used[1] if used is not None and used[0] == a.cut.index else 0
        if 1 <= r <= s.numel():  # issue 12: the rank the ASNet really uses
            ax.plot([r], [float(s[r - 1] / s[0])], "x", markersize=10, color=ax.lines[-1].get_color(),
                    label=f"ASNet rank r = {r}")  # fmt: skip
    ax.set_xlabel("index i")
    ax.set_ylabel("sigma_i / sigma_1 (gradient sketch)")
    ax.set_title(f"Active-subspace spectrum (dots: active neurons at --energy-tol {eps}; x: r used)", fontsize=10)
    if analyses:
        ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return fig


def baselines_figure(analyses: list[LayerAnalysis], results: dict[str, Any]) -> Any:
    """Thesis fig. 6.5b from the report's fields: LR on each layer's features, and the baselines
    at the ASNet's r against the teacher, on a full 0-100% axis with the test-image count."""
    from odekit.writers.plots import new_figure

    with_lr = [a for a in analyses if a.logreg_accuracy is not None]
    n = results.get("teacher", {}).get("accuracy_n")
    on = f" (n = {n} test images)" if n else ""
    panels = int(bool(with_lr)) + int("baselines" in results)
    fig, axes = new_figure(max(panels, 1), 1, (5.5, 4.0))
    col = 0
    if with_lr:
        ax = axes[0][col]
        ax.bar([str(a.cut.index) for a in with_lr], [100 * float(a.logreg_accuracy or 0) for a in with_lr], color="tab:red")
        ax.set_xlabel("cut layer")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Logistic regression on layer features{on}", fontsize=10)
        ax.set_ylim(0, 100)  # a full axis: bars cut at 87% exaggerate small gaps
        col += 1
    if "baselines" in results:
        ax = axes[0][col]
        base = results["baselines"]
        keys = [k for k in ("as_pce", "pca_pce", "as_logreg", "pca_logreg", "logreg_features") if k in base]
        labels = {"as_pce": "AS+PCE", "pca_pce": "PCA+PCE", "as_logreg": "AS+LR", "pca_logreg": "PCA+LR", "logreg_features": "LR"}
        values = [100 * float(base[k]) for k in keys]
        ax.bar([labels[k] for k in keys], values, color=["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:red"][: len(keys)])
        ax.axhline(100 * results["teacher"]["accuracy"], color="black", linestyle="--", label="teacher")
        ax.set_ylim(0, 112)  # headroom above 100% keeps the legend off the bars
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"Cut {results['cut']['index']}, r = {results['cut']['rank']}, no fine-tuning{on}", fontsize=10)
        ax.legend(loc="upper right", fontsize=8)
    return fig
