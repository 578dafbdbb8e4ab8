"""Figures for attack reports (matplotlib `Figure` objects; the CLI saves them atomically)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor


def _image(t: Tensor) -> np.ndarray:
    a = t.detach().float().cpu().numpy()
    if a.ndim == 3:
        return a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
    if a.ndim == 1:
        side = round(a.size**0.5)
        return a.reshape(side, side) if side * side == a.size else a.reshape(1, -1)
    return a


def _show(ax: object, t: Tensor, title: str, cmap: str = "gray", symmetric: bool = False) -> None:
    img = _image(t)
    kwargs: dict[str, object] = {"interpolation": "nearest"}
    if img.ndim == 2:
        kwargs["cmap"] = cmap
        if symmetric:
            lim = float(np.abs(img).max()) or 1.0
            kwargs.update(vmin=-lim, vmax=lim)
        else:
            kwargs.update(vmin=0.0, vmax=1.0)
    else:
        img = (img - img.min()) / (np.ptp(img) or 1.0) if symmetric else np.clip(img, 0, 1)
    ax.imshow(img, **kwargs)  # type: ignore[attr-defined]
    ax.set_title(title, fontsize=9)  # type: ignore[attr-defined]
    ax.set_xticks([])  # type: ignore[attr-defined]
    ax.set_yticks([])  # type: ignore[attr-defined]


def examples_figure(
    x: Tensor,
    x_adv: Tensor,
    before: Sequence[int],
    after: Sequence[int],
    title: str,
    vector: Tensor | None = None,
    vector_title: str = "perturbation",
) -> Figure:
    """Row 1: clean samples with predictions; row 2: attacked ones (red title = changed);
    with ``vector``, a first column shows the universal perturbation."""
    n = len(x)
    cols = n + (1 if vector is not None else 0)
    fig = Figure(figsize=(1.8 * cols, 4.5))
    axes = fig.subplots(2, cols, squeeze=False)
    offset = 0
    if vector is not None:
        _show(axes[0][0], vector, vector_title, cmap="RdBu_r", symmetric=True)
        axes[1][0].axis("off")
        offset = 1
    for i in range(n):
        _show(axes[0][offset + i], x[i], f"pred {before[i]}")
        _show(axes[1][offset + i], x_adv[i], f"pred {after[i]}")
        if after[i] != before[i]:
            axes[1][offset + i].title.set_color("red")
    fig.suptitle(title, fontsize=10)
    return fig


def curve_figure(
    eps: Sequence[float], robust: Sequence[float], clean: float, title: str, xlabel: str
) -> Figure:
    """Robust accuracy against the budget."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    ax.plot([0.0, *eps], [clean, *robust], marker="o")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=10)
    return fig


def matrix_figure(names: Sequence[str], values: Sequence[Sequence[float]], title: str) -> Figure:
    """Heat map: rows are sources, columns targets."""
    a = np.asarray(values, dtype=float)
    fig = Figure(figsize=(1.4 * len(names) + 2.5, 1.1 * len(names) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(a, vmin=0.0, vmax=1.0, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("target (evaluated on)")
    ax.set_ylabel("source (generated on)")
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            ax.text(
                j,
                i,
                f"{100 * a[i, j]:.1f}%",
                ha="center",
                va="center",
                color="w" if a[i, j] < 0.6 else "k",
            )
    fig.colorbar(im, ax=ax, label="fooling rate")
    ax.set_title(title, fontsize=10)
    return fig


def sweep_figure(
    budgets: Sequence[float],
    rates: Sequence[float],
    lows: Sequence[float],
    highs: Sequence[float],
    title: str,
    xlabel: str,
    fit_rates: Sequence[float] | None = None,
    spread: Sequence[float] | None = None,
) -> Figure:
    """Fooling rate against the budget with its Wilson 95% band; optionally the fit-set curve
    and, over several seeds, error bars of one standard deviation."""
    order = np.argsort(np.asarray(budgets, dtype=float))
    b = np.asarray(budgets, dtype=float)[order]
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    r = np.asarray(rates, dtype=float)[order]
    ax.fill_between(b, np.asarray(lows)[order], np.asarray(highs)[order], alpha=0.2,
                    label="test, Wilson 95%")  # fmt: skip
    if spread is not None:
        ax.errorbar(b, r, yerr=np.asarray(spread, dtype=float)[order], marker="o", capsize=3,
                    label="test (mean, std over seeds)")  # fmt: skip
    else:
        ax.plot(b, r, marker="o", label="test")
    if fit_rates is not None:
        ax.plot(b, np.asarray(fit_rates, dtype=float)[order], marker="s", linestyle="--",
                label="fit")  # fmt: skip
    ax.set_xlabel(xlabel)
    ax.set_ylabel("fooling rate")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return fig
