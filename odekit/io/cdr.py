"""Regression data: the embedded CDR surrogate data set and ``.npz`` files with float targets.

CDR (as on the VarPro slides: y in R^55, c in R^72): the steady 2-D convection-diffusion-
reaction problem on the unit square with u = 0 on the boundary,

    -(kx u_xx + ky u_yy) + vx u_x + vy u_y + r u = q,   q = q0 + sum_k a_k exp(-|x - x_k|^2 / (2 s^2)),

is solved by a cell-centred finite-volume scheme (central diffusion, upwind convection) on an
N x N grid with scipy.sparse. Parameters y = (a_1..a_49 on a 7 x 7 grid of centres, vx, vy,
kx, ky, r, q0) are drawn uniformly from fixed ranges with a seed; observables c are u at
9 x 8 sensor cells. Generation takes seconds and is cached as an .npz in ``cache_dir``.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from odekit.errors import DataError, UsageError

CDR_VERSION = 1
SOURCE_GRID = 7
SENSORS = (9, 8)
SOURCE_WIDTH = 0.08
# (low, high) of vx, vy, kx, ky, r, q0; the 49 source amplitudes lie in [0, 1]
COEFFICIENT_RANGES = ((-2.0, 2.0), (-2.0, 2.0), (0.02, 0.1), (0.02, 0.1), (0.0, 5.0), (0.0, 0.5))
REGRESSION_DATASETS = ("cdr", "cdr-transient")


@dataclass
class RegressionData:
    """Inputs normalised per feature (model-input units); targets kept in their own units."""

    name: str
    x_train: torch.Tensor
    c_train: torch.Tensor
    x_test: torch.Tensor
    c_test: torch.Tensor
    mean: list[float]
    std: list[float]
    target_mean: list[float]
    target_std: list[float]
    source: dict[str, Any] = field(default_factory=dict)

    @property
    def num_outputs(self) -> int:
        return int(self.c_train.shape[1])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def normalization(self) -> dict[str, list[float]]:
        return {"mean": list(self.mean), "std": list(self.std)}

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": "regress",
            "input_shape": list(self.input_shape),
            "num_outputs": self.num_outputs,
            "train_samples": int(self.x_train.shape[0]),
            "test_samples": int(self.x_test.shape[0]),
            **self.source,
        }


def _operators(n: int) -> tuple[list[Any], Any, Any]:
    """Component matrices [Dxx, Dyy, Cx+, Cx-, Cy+, Cy-, I], source basis B, sensor map S."""
    import scipy.sparse as sp

    h = 1.0 / n
    e = np.ones(n)
    eye = sp.identity(n, format="csr")
    # -u'' with u = 0 on the walls: ghost cell -u gives 3 on the boundary rows' diagonal
    lap = sp.diags([-e[:-1], 2 * e, -e[:-1]], [-1, 0, 1], format="lil")
    lap[0, 0] = lap[n - 1, n - 1] = 3.0
    lap = lap.tocsr() / h**2
    back = sp.diags([e, -e[:-1]], [0, -1], format="csr") / h  # upwind for velocity > 0
    fwd = sp.diags([e, -e[:-1]], [0, 1], format="csr") / h  # upwind for velocity < 0 (times |v|)
    # unknown index = i * n + j with i the y cell and j the x cell
    mats = [sp.kron(eye, lap), sp.kron(lap, eye), sp.kron(eye, back), sp.kron(eye, fwd),
            sp.kron(back, eye), sp.kron(fwd, eye), sp.identity(n * n)]  # fmt: skip
    centres = (np.arange(n) + 0.5) * h
    gx, gy = np.meshgrid(centres, centres, indexing="xy")
    src = (np.arange(SOURCE_GRID) + 0.5) / SOURCE_GRID
    basis = [np.exp(-((gx - a) ** 2 + (gy - b) ** 2) / (2 * SOURCE_WIDTH**2)).reshape(-1) for b in src for a in src]
    rows = np.linspace(0, n - 1, SENSORS[0] + 2).round().astype(int)[1:-1]
    cols = np.linspace(0, n - 1, SENSORS[1] + 2).round().astype(int)[1:-1]
    sensor_idx = np.array([i * n + j for i in rows for j in cols])
    return [m.tocsc() for m in mats], np.stack(basis, axis=1), sensor_idx


def generate_cdr(samples: int, grid: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(y, c) float64 arrays of shapes (samples, 55) and (samples, 72)."""
    from scipy.sparse.linalg import spsolve

    if samples < 2 or grid < 12:
        raise UsageError(f"CDR needs `data_size` >= 2 and a grid of 12+ cells, got {samples}, {grid}")
    mats, basis, sensors = _operators(grid)
    rng = np.random.default_rng(seed)
    amps = rng.uniform(0.0, 1.0, (samples, SOURCE_GRID**2))
    coef = np.stack([rng.uniform(lo, hi, samples) for lo, hi in COEFFICIENT_RANGES], axis=1)
    c = np.empty((samples, len(sensors)))
    dxx, dyy, cxp, cxm, cyp, cym, ident = mats
    for i in range(samples):
        vx, vy, kx, ky, r, q0 = coef[i]
        A = kx * dxx + ky * dyy + max(vx, 0) * cxp - min(vx, 0) * cxm + max(vy, 0) * cyp - min(vy, 0) * cym + r * ident
        u = spsolve(A.tocsc(), basis @ amps[i] + q0)
        c[i] = u[sensors]
    return np.concatenate([amps, coef], axis=1), c


def _standardise(train: torch.Tensor, dims: int) -> tuple[list[float], list[float]]:
    mean = train.mean(dim=0).reshape(dims).tolist()
    std = train.std(dim=0).clamp_min(1e-8).reshape(dims).tolist()
    return mean, std


def regression_data(name: str, ytr, ctr, yte, cte, normalization: dict[str, list[float]] | None, source: dict[str, Any],
                    raw_targets: bool = False) -> RegressionData:  # fmt: skip
    """Checked float32 tensors; inputs standardised (or by ``normalization``); target scaling
    recorded for standardised training (identity with ``raw_targets``)."""
    xs = [torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in (ytr, yte)]
    cs = [torch.as_tensor(np.asarray(a), dtype=torch.float32) for a in (ctr, cte)]
    xs = [x.reshape(x.shape[0], -1) for x in xs]
    cs = [c.reshape(c.shape[0], -1) for c in cs]
    for what, t in (("inputs", xs[0]), ("targets", cs[0]), ("test inputs", xs[1]), ("test targets", cs[1])):
        if t.numel() == 0 or not bool(torch.isfinite(t).all()):
            raise DataError(f"{name}: {what} are empty or hold NaN/inf values", "clean the data before training")
    if xs[0].shape[0] != cs[0].shape[0] or xs[1].shape[0] != cs[1].shape[0]:
        raise DataError(f"{name}: inputs and targets differ in sample count", "give one target row per input row")
    if normalization is None:
        mean, std = _standardise(xs[0], xs[0].shape[1])
    else:
        mean, std = list(normalization["mean"]), list(normalization["std"])
    tmean, tstd = _standardise(cs[0], cs[0].shape[1])
    if raw_targets:
        tmean, tstd = [0.0] * len(tmean), [1.0] * len(tstd)
    m, s = torch.tensor(mean), torch.tensor(std)
    return RegressionData(name, (xs[0] - m) / s, cs[0], (xs[1] - m) / s, cs[1], mean, std, tmean, tstd, source)


def _cache_key(samples: int, grid: int, seed: int) -> str:
    tag = f"cdr-v{CDR_VERSION}-n{samples}-g{grid}-s{seed}"
    return f"{tag}-{hashlib.sha256(tag.encode()).hexdigest()[:8]}.npz"


def cached_arrays(path: Path | None, generate: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """(y, c) from the .npz at ``path``, or generated and written there atomically."""
    if path is not None and path.is_file():
        with np.load(path) as arrays:
            return arrays["y"], arrays["c"]
    y, c = generate()
    if path is not None:
        from odekit.writers.atomic import atomic_write_bytes

        buf = io.BytesIO()
        np.savez(buf, y=y, c=c)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, buf.getvalue())
    return y, c


def load_cdr(samples: int = 2000, grid: int = 32, seed: int = 0, cache_dir: Path | None = None,
             normalization: dict[str, list[float]] | None = None, test_fraction: float = 0.2) -> RegressionData:  # fmt: skip
    """The CDR surrogate data set, generated once per (samples, grid, seed) and cached."""
    path = cache_dir / _cache_key(samples, grid, seed) if cache_dir is not None else None
    y, c = cached_arrays(path, lambda: generate_cdr(samples, grid, seed))
    n_test = max(1, round(test_fraction * samples))
    source = {"source": "odekit CDR surrogate (2-D convection-diffusion-reaction, finite volumes)",
              "grid": grid, "seed": seed, "cache": str(path) if path else None}  # fmt: skip
    return regression_data("cdr", y[n_test:], c[n_test:], y[:n_test], c[:n_test], normalization, source)


def load_regression_npz(path: Path, normalization: dict[str, list[float]] | None = None) -> RegressionData:
    """x (inputs) and y (float targets), optionally x_test/y_test; else a seeded 80/20 split."""
    if not path.is_file():
        raise DataError(f"data file '{path}' does not exist", "give a .npz with arrays x and y (float targets)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            content = {k: arrays[k] for k in arrays.files}
    except (ValueError, OSError) as exc:
        raise DataError(f"'{path}' is not a readable .npz file ({exc})", "write it with numpy.savez(path, x=..., y=...)") from exc
    if "x" not in content or "y" not in content:
        raise DataError(f"'{path}' lacks arrays 'x' and 'y' (found {sorted(content)})", "write it with numpy.savez(path, x=..., y=...)")
    x, y = content["x"], content["y"].reshape(len(content["y"]), -1)
    if "x_test" in content and "y_test" in content:
        yt = content["y_test"].reshape(len(content["y_test"]), -1)
        return regression_data(path.stem, x, y, content["x_test"], yt, normalization, {"source": str(path)})
    if len(x) < 2:
        raise DataError(f"'{path}' holds {len(x)} sample(s); a train/test split needs 2+", "add samples or give x_test/y_test")
    order = np.random.default_rng(0).permutation(len(x))
    cut = int(0.8 * len(x))
    return regression_data(path.stem, x[order[:cut]], y[order[:cut]], x[order[cut:]], y[order[cut:]], normalization, {"source": str(path)})


def load_regression(name: str, cache_dir: Path | None = None, samples: int | None = None, seed: int = 0,
                    normalization: dict[str, list[float]] | None = None) -> RegressionData:  # fmt: skip
    """--data cdr (2,000 samples by default), cdr-transient (800) or a .npz file."""
    key = name.strip().lower()
    if key == "cdr":
        return load_cdr(samples or 2000, seed=seed, cache_dir=cache_dir, normalization=normalization)
    if key == "cdr-transient":
        from odekit.io.cdr_transient import load_cdr_transient

        return load_cdr_transient(samples or 800, seed=seed, cache_dir=cache_dir, normalization=normalization)
    if key.endswith(".npz"):
        return load_regression_npz(Path(name), normalization)
    raise UsageError(f"unknown regression data set '{name}'", "use `data` cdr, cdr-transient or a .npz file with x and float targets y")
