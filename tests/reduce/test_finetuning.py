"""Fine-tuning: keep-best on a validation split, BatchNorm recalibration, stable small steps."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from odekit.io.checkpoints import load_model
from odekit.io.datasets import Dataset, Split, load_dataset
from odekit.methods.batchnorm import batchnorm_layers, recalibrate_batchnorm
from odekit.methods.evaluation import accuracy
from odekit.methods.ron import RonSettings, build_student
from odekit.methods.training import TrainSettings, holdout, train_classifier

CPU = torch.device("cpu")


def _digits_mlp() -> tuple[nn.Module, Dataset]:
    data = load_dataset("digits", input_shape=(1, 8, 8))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    train_classifier(model, data, TrainSettings(epochs=3, lr=1e-2, val_fraction=0.0), CPU)
    return model, data


def test_holdout_is_seeded_disjoint_and_never_the_test_split():
    data = load_dataset("digits", input_shape=(1, 8, 8))
    fit, val = holdout(data.train, 0.1, seed=3)
    assert len(val) == round(0.1 * len(data.train)) and len(fit) + len(val) == len(data.train)
    rows = {tuple(r.tolist()) for r in data.train.x.flatten(1)}
    assert all(tuple(r.tolist()) in rows for r in val.x.flatten(1))
    again = holdout(data.train, 0.1, seed=3)[1]
    assert torch.equal(again.x, val.x)
    assert len(holdout(data.train, 0.0)[1]) == 0


def test_keep_best_never_returns_a_model_worse_on_validation_than_the_untuned_one():
    model, data = _digits_mlp()
    before = copy.deepcopy(model.state_dict())
    _, val = holdout(data.train, 0.1, seed=0)
    start = accuracy(model, val)
    # a step size that wrecks the model: every trained epoch is worse, the untuned one is kept
    history = train_classifier(model, data, TrainSettings(epochs=2, lr=5.0, optimizer="sgd", schedule="constant"), CPU)
    assert history.best_epoch == 0 and history.kept_untuned
    assert "untuned model is kept" in history.summary()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert accuracy(model, val) == start == history.epochs[0]["val_accuracy"]
    # an ordinary run: the kept epoch scores at least the untuned one, patience stops early
    history = train_classifier(model, data, TrainSettings(epochs=4, lr=1e-3, patience=1), CPU)
    kept = next(e for e in history.epochs if e["epoch"] == history.best_epoch)
    assert kept["val_accuracy"] >= history.epochs[0]["val_accuracy"]
    assert accuracy(model, val) == kept["val_accuracy"]
    assert history.stopped in ("completed", "patience")


def _resnet_student(n_fit: int = 300):
    loaded = load_model("checkpoints/resnet20_digits.safetensors")
    data = load_dataset("digits", input_shape=(1, 32, 32), normalization=loaded.meta.normalization)
    res = build_student(
        loaded.model, loaded.meta.arch, loaded.meta.args, (1, 32, 32), data.train.x[:n_fit],
        RonSettings(layers="conv14-conv15", rank="24"),
    )  # fmt: skip
    return loaded.model.eval(), res.student.eval(), data


@pytest.fixture(scope="module")
def resnet_student():
    return _resnet_student()


def test_recalibration_restores_a_student_after_its_statistics_are_reset(resnet_student):
    _, built, data = resnet_student
    test = Split(data.test.x[:200], data.test.y[:200])
    student = copy.deepcopy(built)
    good = accuracy(student, test)
    changed = student.changed_batchnorms()
    assert changed and all(any(bn is m for m in student.rest.modules()) for bn in changed)
    every = batchnorm_layers(student)
    assert len(every) > len(changed)  # the pre-model's BatchNorms see the teacher's inputs
    for bn in every:
        bn.reset_running_stats()
    assert accuracy(student, test) < 0.5
    assert recalibrate_batchnorm(student, data.train.x[:600]) == len(every)
    assert accuracy(student, test) >= good - 0.03
    # a standard recalibration loop (train mode, cumulative averages, no gradients) works too:
    # the student's train()/eval() are nn.Module's, no BatchNorm hides in eval mode
    student = copy.deepcopy(built)
    for bn in batchnorm_layers(student):
        bn.reset_running_stats()
        bn.momentum = None
    student.train()
    assert all(m.training for m in student.modules())
    with torch.no_grad():
        for i in range(0, 600, 100):
            student(data.train.x[i : i + 100])
    student.eval()
    assert accuracy(student, test) >= good - 0.03


def test_one_epoch_at_lr_1e3_does_not_diverge_and_keeps_structural_zeros(resnet_student):
    teacher, built, data = resnet_student
    small = Dataset(data.name, Split(data.train.x[:300], data.train.y[:300]), Split(data.test.x[:100], data.test.y[:100]),
                    data.num_classes, data.input_shape, data.mean, data.std)  # fmt: skip
    student = copy.deepcopy(built)
    masks = student.structural_masks()
    settings = TrainSettings(epochs=1, lr=1e-3, batch_size=64, beta=0.1)
    history = train_classifier(student, small, settings, CPU, teacher=teacher, bn_layers=student.changed_batchnorms(),
                               grad_masks=masks, keep_untuned=False)  # fmt: skip
    epoch = history.epochs[1]
    assert torch.isfinite(torch.tensor(epoch["loss"])) and epoch["loss"] < 1.0
    assert epoch["val_accuracy"] >= history.epochs[0]["val_accuracy"] - 0.1
    assert epoch["val_agreement"] >= 0.85
    for weight, mask in masks:
        assert not bool(weight.detach()[~mask].any())  # structural zeros never moved
