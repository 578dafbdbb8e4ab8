"""Shared training loop: per-module learning rates and the after-step hook."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odekit.errors import UsageError
from odekit.io.datasets import load_dataset
from odekit.methods.training import TrainSettings, _optimizer, train_classifier


def test_lr_overrides_make_their_own_groups():
    body, head = nn.Linear(4, 4), nn.Linear(4, 2)
    model = nn.Sequential(body, nn.ReLU(), head)
    opt = _optimizer(model, TrainSettings(lr=1e-3), {head: 1e-5})
    groups = [(g["lr"], sum(p.numel() for p in g["params"])) for g in opt.param_groups]
    assert groups == [(1e-3, 20), (1e-5, 10)]
    assert [g["lr"] for g in _optimizer(model, TrainSettings(lr=1e-3)).param_groups] == [1e-3]
    with pytest.raises(UsageError, match="positive"):
        _optimizer(model, TrainSettings(), {head: 0.0})


def test_train_classifier_hands_each_parameter_its_rate():
    data = load_dataset("digits", input_shape=(1, 8, 8))
    torch.manual_seed(0)
    body, head = nn.Linear(64, 16), nn.Linear(16, 10)
    model = nn.Sequential(nn.Flatten(), body, nn.ReLU(), head)
    head_before = head.weight.detach().clone()
    seen: dict[str, set[float]] = {"body": set(), "head": set()}

    def hook(m: nn.Module, lr_of) -> None:
        seen["body"].add(lr_of(body.weight))
        seen["head"].add(lr_of(head.weight))

    settings = TrainSettings(epochs=1, lr=1e-2, batch_size=256, schedule="constant")
    train_classifier(model, data, settings, torch.device("cpu"), after_step=hook,
                     lr_overrides={head: 1e-9})
    assert seen == {"body": {1e-2}, "head": {1e-9}}
    # Adam moves a parameter by about lr per step: the head stays put.
    assert float((head.weight.detach() - head_before).abs().max()) < 1e-7
