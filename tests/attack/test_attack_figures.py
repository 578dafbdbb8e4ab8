"""The attack example figure explains itself (issue 12, item 5): titles carry the true label and
the prediction, rows are named, the universal vector has a colour bar and its norm. Texts and
axes only, no image comparison."""

from __future__ import annotations

import pytest
import torch

from odekit.io.datasets import load_dataset
from odekit.methods.attacks import RandomAttack, UniversalSettings, lp_norm
from odekit.methods.attacks.experiments import Scoring, universal_experiment
from odekit.methods.attacks.figures import examples_figure

RED = (1.0, 0.0, 0.0, 1.0)


def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


def _is_red(ax) -> bool:
    from matplotlib.colors import to_rgba

    return to_rgba(ax.title.get_color()) == RED


def test_per_sample_panels_name_true_label_prediction_and_rows():
    x = torch.rand(3, 1, 8, 8)
    fig = examples_figure(x, x.flip(-1), [3, 5, 1], [3, 8, 1], "pgd", labels=[3, 5, 7],
                          rows=("clean", "adversarial"))  # fmt: skip
    images = fig.axes
    assert len(images) == 6  # 2 rows x 3 samples, no colour bar without a vector
    top, bottom = images[:3], images[3:]
    assert [ax.get_title() for ax in top] == ["true 3, pred 3", "true 5, pred 5", "true 7, pred 1"]
    assert [ax.get_title() for ax in bottom] == ["true 3, pred 3", "true 5, pred 8", "true 7, pred 1"]
    # red marks a changed prediction only (not a wrong clean one)
    assert [_is_red(ax) for ax in bottom] == [False, True, False]
    assert not any(_is_red(ax) for ax in top)
    assert (top[0].get_ylabel(), bottom[0].get_ylabel()) == ("clean", "adversarial")
    assert fig.get_suptitle() == "pgd"


def test_universal_figure_has_vector_with_colour_bar_and_norm():
    x = torch.rand(2, 1, 8, 8)
    v = torch.zeros(1, 8, 8)
    v[0, 0, 0], v[0, 3, 4] = 0.25, -0.5
    fig = examples_figure(x, (x + v).clamp(0, 1), [0, 9], [4, 9], "as", vector=v,
                          vector_title="v: ||v||_2 = 0.559 px", labels=[0, 9])  # fmt: skip
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 1
    low, high = bars[0].get_ylim()
    assert low == pytest.approx(-0.5) and high == pytest.approx(0.5)  # symmetric, pixel units
    assert "pixel" in bars[0].get_ylabel()
    titles = _titles(fig)
    assert "v: ||v||_2 = 0.559 px" in titles
    assert titles.count("true 0, pred 0") == 1 and "true 0, pred 4" in titles
    labels = [ax.get_ylabel() for ax in fig.axes]
    assert "clean" in labels and "perturbed" in labels


def test_universal_experiment_passes_labels_and_the_vector_norm():
    digits = load_dataset("digits", input_shape=(1, 8, 8), normalization={"mean": [0.0], "std": [1.0]})
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    run = universal_experiment(
        RandomAttack(UniversalSettings(norm="2", delta=2.0)), model, model, digits, digits,
        Scoring(seed=0, batch_size=128, device=torch.device("cpu")),
        fit_samples=20, eval_samples=30, provenance={},
    )  # fmt: skip
    fig = run.figures["attack.png"]
    norm = lp_norm(run.tensors["perturbation_pixel"], "2")
    titles = _titles(fig)
    assert f"v: ||v||_2 = {norm:.3g} px" in titles
    test = digits.test.subset(30, seed=0)
    true = [t.split(",")[0] for t in titles if t.startswith("true ")]
    assert true[:6] == [f"true {int(y)}" for y in test.y[:6]]
    assert any(ax.get_label() == "<colorbar>" for ax in fig.axes)
