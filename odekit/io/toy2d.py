"""Seeded 2-D toy densities for continuous normalizing flows (thesis ch. 2.5.2).

Each generator draws ``n`` points from a fixed numpy ``Generator`` seed and returns a
``(n, 2)`` float32 tensor, roughly inside [-4, 4]^2 (the usual scale for these sets).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from odekit.errors import UsageError
from odekit.registry import Registry

ToyGenerator = Callable[[int, np.random.Generator], np.ndarray]
TOY_DATASETS: Registry[ToyGenerator] = Registry("toy data set")


@TOY_DATASETS.register("2spirals", "two interleaved spirals with Gaussian noise")
def two_spirals(n: int, rng: np.random.Generator) -> np.ndarray:
    angle = np.sqrt(rng.uniform(size=n)) * 3.0 * np.pi  # sqrt: even density along the arc
    radius = angle / np.pi + 0.25
    arm = np.stack([-np.cos(angle) * radius, np.sin(angle) * radius], axis=1)
    sign = np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]  # alternate arms: equal halves
    return arm * sign * 1.3 + rng.normal(scale=0.1, size=(n, 2))


@TOY_DATASETS.register("pinwheel", "five curved Gaussian blades")
def pinwheel(n: int, rng: np.random.Generator) -> np.ndarray:
    num_classes, radial_std, tangential_std, rate = 5, 0.3, 0.1, 0.25
    labels = rng.integers(0, num_classes, size=n)
    feats = rng.normal(size=(n, 2)) * np.array([radial_std, tangential_std])
    feats[:, 0] += 1.0
    angles = 2.0 * np.pi * labels / num_classes + rate * np.exp(feats[:, 0])
    cos, sin = np.cos(angles), np.sin(angles)
    rotated = np.stack([cos * feats[:, 0] - sin * feats[:, 1], sin * feats[:, 0] + cos * feats[:, 1]], axis=1)
    return 2.0 * rotated


@TOY_DATASETS.register("moons", "two interleaving half circles (as sklearn make_moons)")
def moons(n: int, rng: np.random.Generator) -> np.ndarray:
    half = n // 2
    theta_out = np.linspace(0.0, np.pi, n - half)
    theta_in = np.linspace(0.0, np.pi, half)
    outer = np.stack([np.cos(theta_out), np.sin(theta_out)], axis=1)
    inner = np.stack([1.0 - np.cos(theta_in), 0.5 - np.sin(theta_in)], axis=1)
    points = np.concatenate([outer, inner], axis=0) + rng.normal(scale=0.1, size=(n, 2))
    points = (points - np.array([0.5, 0.25])) * 2.0
    return points[rng.permutation(n)]


@TOY_DATASETS.register("circles", "two concentric noisy rings")
def circles(n: int, rng: np.random.Generator) -> np.ndarray:
    half = n // 2
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
    radius = np.where(np.arange(n) < half, 1.0, 0.5)
    points = np.stack([np.cos(angle), np.sin(angle)], axis=1) * radius[:, None] * 3.0
    points += rng.normal(scale=0.08, size=(n, 2))
    return points[rng.permutation(n)]


@TOY_DATASETS.register("checkerboard", "uniform density on the black squares of a 4x4 board")
def checkerboard(n: int, rng: np.random.Generator) -> np.ndarray:
    x1 = rng.uniform(size=n) * 4.0 - 2.0
    x2 = rng.uniform(size=n) - rng.integers(0, 2, size=n) * 2.0
    x2 = x2 + np.floor(x1) % 2
    return np.stack([x1, x2], axis=1) * 2.0


def sample_toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` points of the toy set ``name`` as a (n, 2) float32 tensor; same seed, same points."""
    generator = TOY_DATASETS.get(name)
    if n < 1:
        raise UsageError(f"asked for {n} toy samples", "ask for at least one sample")
    points = generator(int(n), np.random.default_rng(seed))
    return torch.as_tensor(np.asarray(points, dtype=np.float32))


@dataclass
class ToyData:
    """Train/test point clouds of one toy density (independent seeds, same distribution)."""

    name: str
    train: torch.Tensor
    test: torch.Tensor
    seed: int

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "kind": "toy2d",
            "input_shape": [2],
            "train_samples": int(self.train.shape[0]),
            "test_samples": int(self.test.shape[0]),
            "seed": self.seed,
            "source": "odekit.io.toy2d (generated in-process)",
        }


def load_toy(name: str, n_train: int = 10_000, n_test: int = 2_000, seed: int = 0) -> ToyData:
    """Seeded train and test sets; the test seed is derived from ``seed`` so they never overlap."""
    key = TOY_DATASETS.entry(name).name
    return ToyData(key, sample_toy(key, n_train, seed), sample_toy(key, n_test, seed + 1_000_003), seed)
