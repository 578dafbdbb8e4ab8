"""Train the checkpoints shipped in checkpoints/ (seeded, CPU, a few minutes in all).

    python scripts/train_zoo.py            # all of them
    python scripts/train_zoo.py --only lenet300_digits --out /tmp/zoo

Each job builds a registered architecture, trains it on the embedded digits data and writes
`<name>.safetensors` with odekit metadata; checkpoints/README.md records the accuracies.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from odekit.io.checkpoints import ModelMeta, save_model
from odekit.io.datasets import load_dataset
from odekit.methods.evaluation import accuracy, model_cost
from odekit.methods.training import TrainSettings, train_classifier
from odekit.models import build_model


@dataclass(frozen=True)
class ZooJob:
    arch: str
    args: dict[str, Any]
    input_shape: tuple[int, ...]
    settings: TrainSettings
    description: str


CLASSIFIER_JOBS: dict[str, ZooJob] = {
    "lenet300_digits": ZooJob(
        "lenet300", {"num_classes": 10}, (1, 28, 28),
        TrainSettings(epochs=30, lr=1e-3, batch_size=64, weight_decay=1e-4, seed=0, val_fraction=0.0),
        "LeNet-300-100 on digits resized to 28x28",
    ),
    "lenet5_digits": ZooJob(
        "lenet5", {"num_classes": 10}, (1, 28, 28),
        TrainSettings(epochs=30, lr=2e-3, batch_size=64, weight_decay=1e-4, seed=0, val_fraction=0.0),
        "LeNet-5 on digits resized to 28x28",
    ),
    "vgg11_digits": ZooJob(
        "vgg11_bn", {"num_classes": 10, "width": 0.25, "in_channels": 1}, (1, 32, 32),
        TrainSettings(epochs=30, lr=2e-3, batch_size=64, weight_decay=5e-4, seed=0, val_fraction=0.0),
        "CIFAR-style VGG-11 with BatchNorm, width 1/4, on digits resized to 32x32",
    ),
    "resnet20_digits": ZooJob(
        "resnet20", {"num_classes": 10, "in_channels": 1}, (1, 32, 32),
        TrainSettings(epochs=30, lr=2e-3, batch_size=64, weight_decay=5e-4, seed=0, val_fraction=0.0),
        "CIFAR-style ResNet-20 (option A shortcuts) on digits resized to 32x32",
    ),
}  # fmt: skip


def train_classifier_job(name: str, job: ZooJob, out: Path) -> dict[str, Any]:
    torch.manual_seed(job.settings.seed)
    data = load_dataset("digits", input_shape=job.input_shape)
    model = build_model(job.arch, job.args)
    device = torch.device("cpu")
    history = train_classifier(model, data, job.settings, device)
    acc = accuracy(model, data.test)
    meta = ModelMeta(
        arch=job.arch,
        args=job.args,
        num_classes=data.num_classes,
        input_shape=list(job.input_shape),
        normalization=data.normalization(),
        dataset=data.describe(),
        history=[{"command": "scripts/train_zoo.py", "job": name, "settings": job.settings.__dict__,
                  "final_epoch": history.final}],
        extra={"test_accuracy": acc, "description": job.description},
    )  # fmt: skip
    save_model(out / f"{name}.safetensors", model, meta, force=True)
    cost = model_cost(model, job.input_shape)
    return {"name": name, "arch": job.arch, "test_accuracy": acc, **cost.to_dict(), "description": job.description}


# Other modules (e.g. the ODE models) add their own jobs here: name -> callable(out_dir) -> summary.
EXTRA_JOBS: dict[str, Callable[[Path], dict[str, Any]]] = {}


def _load_extra_jobs() -> None:
    try:
        from train_zoo_ode import ODE_JOBS  # type: ignore[import-not-found]  # scripts/train_zoo_ode.py
    except ImportError:
        return
    EXTRA_JOBS.update(ODE_JOBS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "checkpoints")
    parser.add_argument("--only", action="append", help="train only these jobs (repeatable)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (fixed for reproducibility)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    _load_extra_jobs()
    names = list(CLASSIFIER_JOBS) + list(EXTRA_JOBS)
    selected = args.only or names
    unknown = [n for n in selected if n not in names]
    if unknown:
        parser.error(f"unknown job(s) {unknown}; choose from {names}")
    args.out.mkdir(parents=True, exist_ok=True)
    for name in selected:
        start = time.perf_counter()
        if name in CLASSIFIER_JOBS:
            summary = train_classifier_job(name, CLASSIFIER_JOBS[name], args.out)
        else:
            summary = EXTRA_JOBS[name](args.out)
        summary["train_seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
