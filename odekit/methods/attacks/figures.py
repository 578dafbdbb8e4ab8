"""Figures for attack reports (matplotlib `Figure` objects; the CLI saves them atomically)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.axes import Axes
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


def _show(ax: Axes, t: Tensor, title: str) -> None:
    """A sample in [0, 1] pixels (grey scale or colour)."""
    img = np.clip(_image(t), 0.0, 1.0)
    if img.ndim == 2:
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    _frame(ax, title)


def _frame(ax: Axes, title: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])


def _show_vector(fig: Figure, ax: Axes, v: Tensor, title: str) -> None:
    """The universal vector as a signed heat map, zero white, with a colour bar in [0, 1]-pixel
    units over a symmetric range; colour inputs show the mean over their channels."""
    channels = v.shape[0] if v.ndim == 3 else 1
    img = _image(v.mean(0) if channels > 1 else v)
    lim = float(np.abs(img).max()) or 1.0
    im = ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
    _frame(ax, title + ("\n(channel mean)" if channels > 1 else ""))
    bar = fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    bar.set_label("pixel change ([0, 1] units)", fontsize=7)
    bar.ax.tick_params(labelsize=7)


def _prediction(label: int | None, pred: int) -> str:
    return f"pred {pred}" if label is None else f"true {label}, pred {pred}"


def examples_figure(
    x: Tensor,
    x_adv: Tensor,
    before: Sequence[int],
    after: Sequence[int],
    title: str,
    vector: Tensor | None = None,
    vector_title: str = "perturbation",
    *,
    labels: Sequence[int] | None = None,
    rows: tuple[str, str] = ("clean", "perturbed"),
) -> Figure:
    """Row ``rows[0]``: clean samples titled with their true label (``labels``) and prediction;
    row ``rows[1]``: the attacked ones, titles in red where the prediction changed. With
    ``vector``, a first column shows the universal perturbation with its colour bar."""
    n = len(x)
    cols = n + (1 if vector is not None else 0)
    fig = Figure(figsize=(1.8 * cols + (0.8 if vector is not None else 0.3), 4.6))
    axes = fig.subplots(2, cols, squeeze=False)
    offset = 0
    if vector is not None:
        _show_vector(fig, axes[0][0], vector, vector_title)
        axes[1][0].axis("off")
        axes[1][0].text(0.5, 0.5, f"{rows[1]} =\nclip(clean + v)", ha="center", va="center",
                        fontsize=8, transform=axes[1][0].transAxes)  # fmt: skip
        offset = 1
    for i in range(n):
        label = None if labels is None else int(labels[i])
        _show(axes[0][offset + i], x[i], _prediction(label, before[i]))
        _show(axes[1][offset + i], x_adv[i], _prediction(label, after[i]))
        if after[i] != before[i]:
            axes[1][offset + i].title.set_color("red")
    if n:
        for row, name in enumerate(rows):
            axes[row][offset].set_ylabel(name, fontsize=10)
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
