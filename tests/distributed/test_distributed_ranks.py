"""Two ranks on CPU/gloo over loopback, spawned by the test: merged numbers vs one process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from odekit.linalg.active import dominant_direction
from odekit.linalg.sketch import FrequentDirections, subspace_sin_theta
from odekit.methods.pce import PCELayer, fit_pce

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _worker  # noqa: E402
from rank_spawner import spawn_ranks  # noqa: E402

WORKER = str(HERE / "_worker.py")


def _single_process_sketch(a: torch.Tensor) -> FrequentDirections:
    fd = FrequentDirections(_worker.D, _worker.ELL)
    for i in range(0, a.shape[0], _worker.BATCH):
        fd.update(a[i : i + _worker.BATCH])
    return fd


def _top_subspace(b: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    _, s, vh = torch.linalg.svd(b, full_matrices=False)
    return s, vh[:k].T


def _check_merge(result: dict, world: int) -> None:
    a = _worker.test_matrix()
    b = result["sketch"]
    assert result["world"] == world
    assert result["n_rows"] == _worker.N
    assert result["frobenius_sq"] == pytest.approx(float(a.pow(2).sum()), rel=1e-12)
    # certified: 0 <= A^T A - B^T B <= delta (spectral norm), for the merged sketch
    err = a.T @ a - b.T @ b
    evals = torch.linalg.eigvalsh(err)
    delta = result["delta"]
    assert result["merge"]["covariance_error_bound"] == pytest.approx(delta)
    assert float(evals[-1]) <= delta * (1 + 1e-9)
    assert float(evals[0]) >= -1e-9 * float(a.pow(2).sum())
    # subspace: the merged and the one-process sketch are both within their Davis-Kahan bounds
    k = 3
    _, exact_v = _top_subspace(a, k)
    single = _single_process_sketch(a)
    s_m, v_m = _top_subspace(b, k)
    s_1, v_1 = _top_subspace(single.sketch, k)
    bound_m = delta / float(s_m[k - 1] ** 2 - s_m[k] ** 2)
    bound_1 = single.delta / float(s_1[k - 1] ** 2 - s_1[k] ** 2)
    assert bound_m < 0.5  # the test matrix's spectral gap makes the bound informative
    assert subspace_sin_theta(exact_v, v_m) <= bound_m
    assert subspace_sin_theta(v_1, v_m) <= bound_m + bound_1
    # communication: one sketch (ell x D float64 + 5 statistics) per sending rank
    assert result["merge"]["bytes_per_rank"] == (_worker.ELL * _worker.D + 5) * 8
    assert result["merge"]["bytes_total"] == (world - 1) * result["merge"]["bytes_per_rank"]


def _check_exact_fits(result: dict) -> None:
    z, y = _worker.regression(_worker.N)
    x = torch.cat([z, torch.ones(z.shape[0], 1, dtype=torch.float64)], 1)
    coef = torch.linalg.lstsq(x, y).solution
    assert torch.allclose(result["coef"], coef, atol=1e-6, rtol=0)
    layer = PCELayer(3, 2, 1).double()
    fit_pce(layer, [(z, y)])
    assert result["pce_samples"] == _worker.N
    assert torch.allclose(result["pce"], layer.linear.weight.detach(), atol=1e-6, rtol=0)
    assert result["count"] == _worker.N
    assert result["mean"] == pytest.approx(float(y.mean()), rel=1e-12)
    assert result["picked"].tolist() == [0, 7, 14, 21, 28]
    assert torch.allclose(result["direction"], dominant_direction(_worker.test_matrix()), atol=1e-10)
    assert result["ranks"] == {"ranks": [3, 1]}


def test_two_ranks_merge_within_bound_and_exact_fits(tmp_path: Path) -> None:
    run = spawn_ranks([WORKER, "merge", str(tmp_path)], world=2)
    assert run.returncodes == [0, 0], run.stderr
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    _check_merge(result, 2)
    _check_exact_fits(result)


def test_fault_on_rank_one_ends_both_ranks(tmp_path: Path) -> None:
    run = spawn_ranks([WORKER, "fault", str(tmp_path)], world=2, timeout=90)
    assert run.returncodes == [1, 1], run.stderr
    assert max(run.ended_at) - min(run.ended_at) < 60  # the healthy rank follows the failed one
    errors = [line for err in run.stderr for line in err.splitlines() if line.startswith("Error:")]
    assert errors == ["Error: rank 1: injected fault on purpose. Hint: this is a test"]
    assert run.stderr[0] == ""  # rank 0 stays silent
    assert not (tmp_path / "rank0-finished").exists()


@pytest.mark.slow
def test_three_ranks_tree_merge(tmp_path: Path) -> None:
    run = spawn_ranks([WORKER, "merge", str(tmp_path)], world=3)
    assert run.returncodes == [0, 0, 0], run.stderr
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    assert result["merge"]["rounds"] == 2
    _check_merge(result, 3)
    _check_exact_fits(result)


@pytest.mark.slow
def test_silent_crash_on_rank_one_ends_rank_zero(tmp_path: Path) -> None:
    run = spawn_ranks([WORKER, "crash", str(tmp_path)], world=2, timeout=90, extra_env={"STALE_S": "5"})
    assert run.returncodes[1] == 3
    assert run.returncodes[0] != 0
    assert max(run.ended_at) - min(run.ended_at) < 60  # the healthy rank follows the failed one
    assert not (tmp_path / "rank0-finished").exists()


@pytest.mark.slow
def test_two_rank_ron_student_agrees_with_one_process(tmp_path: Path) -> None:
    run = spawn_ranks([WORKER, "ron", str(tmp_path)], world=2)
    assert run.returncodes == [0, 0], run.stderr
    two = torch.load(tmp_path / "result.pt", weights_only=True)
    single, predictions = _worker.ron_student(None)
    assert two["n_samples"] == single.n_samples == 600
    assert two["stream_samples"] == 300  # rank 0 streamed its half
    assert two["ranks"] == single.ranks == [32, 24]
    agreement = float((two["predictions"] == predictions).double().mean())
    assert agreement >= 0.99
    assert all(b >= 0 for b in two["merge_bounds"])


def test_two_rank_channel_student_equals_one_process(tmp_path: Path) -> None:
    """`reduce --mode channel` on two ranks: each streams half the fitting images and scores half
    the validation images, the summed moments give both ranks the one-process student."""
    run = spawn_ranks([WORKER, "channel", str(tmp_path)], world=2)
    assert run.returncodes == [0, 0], run.stderr
    ranks = [torch.load(tmp_path / f"result-{r}.pt", weights_only=True) for r in range(2)]
    single = _worker.channel_students(None)
    for name in ("budget", "rank"):
        zero, one, alone = ranks[0][name], ranks[1][name], single[name]
        assert zero["widths"] == one["widths"] == alone["widths"]
        assert sum(zero["widths"]) < 12 + 16  # something was cut
        assert torch.equal(zero["out"], one["out"])  # the ranks' students are the same
        scale = float(alone["out"].abs().max())
        assert float((zero["out"] - alone["out"]).abs().max()) <= 1e-5 * max(scale, 1.0)
        half = _worker.CHANNEL_FIT // 2
        assert zero["distributed"]["world_size"] == 2
        assert zero["distributed"]["fit_images_per_rank"] == [half, half]
        assert alone["distributed"]["fit_images_per_rank"] == [_worker.CHANNEL_FIT]
    chosen = [[c["chosen"] for c in r["budget"]["candidates"]] for r in (*ranks, single)]
    assert chosen[0] == chosen[1] == chosen[2]
    assert ranks[0]["budget"]["distributed"]["validation_images_per_rank"] == [20, 20]
