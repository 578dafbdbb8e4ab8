"""The paper's CDR regime: a time-dependent convection-diffusion-reaction problem, 55 -> 72.

As in "Train Like a (Var)Pro" (800 samples, y in R^55 -> c in R^72, 400/200/200 split, raw
targets), our own instance of

    du/dt = div(D grad u) - v . grad u + f + sum_i y_i r_i(u),   D grad u . n = 0,   u(0) = 0,

on the unit square: cell-centred finite volumes on an N x N grid (central diffusion,
conservative upwind convection, no flux through the walls), constant D = 0.02 and
v = (0.8, 0.4), a fixed Gaussian source f at (0.25, 0.3), and 55 reaction terms
r_i(u) = -k phi_i(x) u: first-order decay localised in Gaussian zones phi_i on an 11 x 5 grid
(k = 8). The parameters y_i in [0, 1] are the zones' decay rates. Implicit Euler with 48 steps
on [0, 1] (one sparse LU per sample); c = u at 6 sensor cells at 12 times (every 4th step).
The map y -> c is smooth and nonlinear (u depends on y through exp(-k t phi . y)-like
factors). Seeded; 800 samples take a few seconds and are cached like ``cdr``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from odekit.errors import UsageError
from odekit.io.cdr import RegressionData, cached_arrays, regression_data

TRANSIENT_VERSION = 1
ZONES = (11, 5)  # 55 reaction zones
ZONE_WIDTH = 0.08
DECAY = 8.0
DIFFUSION = 0.02
VELOCITY = (0.8, 0.4)
SOURCE = (0.25, 0.3, 0.06, 20.0)  # x, y, width, strength
SENSORS = ((0.3, 0.7), (0.5, 0.5), (0.7, 0.3), (0.7, 0.7), (0.85, 0.5), (0.5, 0.85))
STEPS, OBSERVE_EVERY = 48, 4  # 12 observation times
SPLIT = (0.5, 0.25, 0.25)  # train, validation (held out), test


def _transport(n: int) -> Any:
    """The sparse operator of div(D grad u) - div(v u) with no flux through the walls."""
    import scipy.sparse as sp

    h = 1.0 / n
    e = np.ones(n)
    lap = sp.diags([e[:-1], -2 * e, e[:-1]], [-1, 0, 1], format="lil")
    lap[0, 0] = lap[n - 1, n - 1] = -1.0  # zero-flux walls
    lap = lap.tocsr() / h**2

    def upwind(v: float) -> Any:
        """-d(v u)/dx, conservative upwind, zero flux at the walls (v > 0: from the left cell)."""
        if v >= 0:
            m = sp.diags([v * e[:-1], -v * np.r_[e[:-1], 0.0]], [-1, 0], format="csr")
        else:
            m = sp.diags([-v * e[:-1], v * np.r_[0.0, e[:-1]]], [1, 0], format="csr")
        return m / h

    eye = sp.identity(n, format="csr")
    # unknown index = i * n + j with i the y cell and j the x cell
    return DIFFUSION * (sp.kron(eye, lap) + sp.kron(lap, eye)) + sp.kron(eye, upwind(VELOCITY[0])) + sp.kron(upwind(VELOCITY[1]), eye)


def _fields(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zone functions (n^2, 55), the source (n^2,) and the sensor cell indices (6,)."""
    c = (np.arange(n) + 0.5) / n
    gx, gy = np.meshgrid(c, c, indexing="xy")
    zx = (np.arange(ZONES[0]) + 0.5) / ZONES[0]
    zy = (np.arange(ZONES[1]) + 0.5) / ZONES[1]
    zones = np.stack([np.exp(-((gx - a) ** 2 + (gy - b) ** 2) / (2 * ZONE_WIDTH**2)).reshape(-1) for b in zy for a in zx], axis=1)
    sx, sy, sw, strength = SOURCE
    source = strength * np.exp(-((gx - sx) ** 2 + (gy - sy) ** 2) / (2 * sw**2)).reshape(-1)
    sensors = np.array([min(int(y * n), n - 1) * n + min(int(x * n), n - 1) for x, y in SENSORS])
    return zones, source, sensors


def generate_cdr_transient(samples: int, grid: int = 16, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(y, c) float64 arrays of shapes (samples, 55) and (samples, 72); c ordered time-major."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import splu

    if samples < 4 or grid < 8:
        raise UsageError(f"cdr-transient needs `data_size` >= 4 and a grid of 8+ cells, got {samples}, {grid}")
    transport = _transport(grid)
    zones, source, sensors = _fields(grid)
    dt = 1.0 / STEPS
    rng = np.random.default_rng(seed)
    y = rng.uniform(0.0, 1.0, (samples, zones.shape[1]))
    c = np.empty((samples, len(sensors) * STEPS // OBSERVE_EVERY))
    eye = sp.identity(grid * grid, format="csc")
    for i in range(samples):
        decay = sp.diags(DECAY * (zones @ y[i]))
        lu = splu((eye - dt * (transport - decay)).tocsc())
        u = np.zeros(grid * grid)
        seen = []
        for step in range(1, STEPS + 1):
            u = lu.solve(u + dt * source)
            if step % OBSERVE_EVERY == 0:
                seen.append(u[sensors])
        c[i] = np.concatenate(seen)
    return y, c


def load_cdr_transient(samples: int = 800, grid: int = 16, seed: int = 0, cache_dir: Path | None = None,
                       normalization: dict[str, list[float]] | None = None) -> RegressionData:  # fmt: skip
    """800 samples by default, split 50/25/25 (train/validation/test, seeded); raw targets."""
    tag = f"cdr-transient-v{TRANSIENT_VERSION}-n{samples}-g{grid}-s{seed}"
    path = cache_dir / f"{tag}-{hashlib.sha256(tag.encode()).hexdigest()[:8]}.npz" if cache_dir is not None else None
    y, c = cached_arrays(path, lambda: generate_cdr_transient(samples, grid, seed))
    order = np.random.default_rng(seed).permutation(samples)
    n_train, n_val = round(SPLIT[0] * samples), round(SPLIT[1] * samples)
    train, test = order[:n_train], order[n_train + n_val :]
    source = {"source": "odekit time-dependent CDR (2-D, finite volumes, implicit Euler)", "grid": grid, "seed": seed,
              "split": [len(train), n_val, len(test)], "validation": "held out (not used)", "targets": "raw",
              "cache": str(path) if path else None}  # fmt: skip
    return regression_data("cdr-transient", y[train], c[train], y[test], c[test], normalization, source, raw_targets=True)
