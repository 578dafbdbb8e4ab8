"""`python -m odekit reduce` launched as 2 ranks (torchrun's variables, gloo on loopback)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from odekit.io.checkpoints import load_model, save_model
from odekit.io.datasets import dataset_for_model
from odekit.io.integrity import DIGEST_KEY, tensor_digest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from rank_spawner import ROOT, spawn_ranks  # noqa: E402

LENET = ROOT / "checkpoints" / "lenet300_digits.safetensors"
REDUCE = ["-m", "odekit", "reduce", "model.safetensors", "--layers", "1-2", "--rank", "40,30",
          "--samples", "400", "--latency-batch", "8", "--threads", "1"]  # fmt: skip


def _rank_dirs(tmp_path: Path, poison_rank1: bool) -> list[Path]:
    """One working folder per rank holding model.safetensors; rank 1's has a NaN weight when
    ``poison_rank1`` (its activations then hold NaN: a fault in the middle of the stream)."""
    loaded = load_model(LENET)
    dirs = []
    for rank in range(2):
        folder = tmp_path / f"rank{rank}"
        folder.mkdir()
        path = folder / "model.safetensors"
        save_model(path, loaded.model, loaded.meta)
        if rank == 1 and poison_rank1:  # save_model refuses NaN: edit the written file instead
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
                tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
            first = next(k for k, v in tensors.items() if v.is_floating_point() and v.dim() == 2)
            tensors[first][0, 0] = float("nan")
            metadata[DIGEST_KEY] = tensor_digest(tensors)  # a consistent file, just a bad weight
            save_file(tensors, str(path), metadata=metadata)
        dirs.append(folder)
    return dirs


@pytest.mark.slow
def test_fault_on_rank_one_exits_both_and_writes_nothing(tmp_path: Path) -> None:
    out, scratch = tmp_path / "out", tmp_path / "scratch"
    scratch.mkdir()
    run = spawn_ranks(
        [*REDUCE, "--out", str(out)], world=2, timeout=120, cwds=_rank_dirs(tmp_path, True),
        extra_env={"TMPDIR": str(scratch)},
    )
    assert run.returncodes == [1, 1], run.stderr
    assert max(run.ended_at) - min(run.ended_at) < 60  # the healthy rank follows the failed one
    errors = [line for err in run.stderr for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: rank 1: "), run.stderr
    assert "NaN" in errors[0]
    assert not out.exists() or not any(out.iterdir())
    assert not list(scratch.glob("odekit-rank*"))  # rank 1's private folder is gone too
    assert not any(p.name.startswith(".out.odekit") for p in tmp_path.iterdir())  # no staging, no lock


@pytest.mark.slow
def test_two_ranks_reduce_agrees_with_one_process(tmp_path: Path) -> None:
    dirs = _rank_dirs(tmp_path, False)
    two = spawn_ranks([*REDUCE, "--out", str(tmp_path / "two"), "--json"], world=2, cwds=dirs)
    assert two.returncodes == [0, 0], two.stderr
    one = spawn_ranks([*REDUCE, "--out", str(tmp_path / "one"), "--json"], world=1, cwds=dirs)
    assert one.returncodes == [0], one.stderr
    report = json.loads((tmp_path / "two" / "report.json").read_text())
    assert (report["world_size"], report["backend"]) == (2, "gloo")
    merges = report["results"]["distributed"]["sketch_merges"]
    assert [m["n_rows"] for m in merges] == [400, 400]
    assert json.loads((tmp_path / "one" / "report.json").read_text())["world_size"] == 1
    loaded = load_model(LENET)
    data = dataset_for_model(loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset)
    with torch.no_grad():
        p2 = load_model(tmp_path / "two" / "student.safetensors").model.eval()(data.test.x).argmax(1)
        p1 = load_model(tmp_path / "one" / "student.safetensors").model.eval()(data.test.x).argmax(1)
    assert float((p1 == p2).double().mean()) >= 0.99
    assert report["results"]["student"]["accuracy"] == pytest.approx(float((p2 == data.test.y).double().mean()))


@pytest.mark.slow
def test_two_ranks_asnet_with_finetune(tmp_path: Path) -> None:
    """Gradient sketches merged, PCE normal equations summed, DDP fine-tuning: one ASNet."""
    dirs = _rank_dirs(tmp_path, False)
    args = ["-m", "odekit", "asnet", "model.safetensors", "--cut", "1", "--rank", "8", "--degree", "2",
            "--samples", "400", "--finetune", "1", "--no-latency", "--threads", "1", "--json"]  # fmt: skip
    two = spawn_ranks([*args, "--out", str(tmp_path / "two")], world=2, cwds=dirs)
    assert two.returncodes == [0, 0], two.stderr
    one = spawn_ranks([*args, "--out", str(tmp_path / "one")], world=1, cwds=dirs)
    assert one.returncodes == [0], one.stderr
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    assert (r2["world_size"], r2["backend"]) == (2, "gloo")
    assert r2["results"]["cut"]["gradient_samples"] == r1["results"]["cut"]["gradient_samples"] == 400
    assert r2["results"]["pce"]["n_samples"] == 400
    assert any("baselines skipped" in w for w in r2["results"]["warnings"])
    assert len(r2["results"]["finetune"]["history"]) == 2  # epoch 0 (untuned, scored for keep-best) and epoch 1
    assert abs(r2["results"]["asnet"]["accuracy"] - r1["results"]["asnet"]["accuracy"]) < 0.03


@pytest.mark.slow
def test_two_ranks_train_ode_follows_one_process(tmp_path: Path) -> None:
    """Each rank takes its half of every seeded batch and the weighted gradients are summed:
    the 2-rank run is the 1-process run up to floating-point summation order (with layer norm:
    BatchNorm statistics, as in DDP, are those of each rank's half batch)."""
    args = ["-m", "odekit", "train-ode", "--width", "8", "--batch-size", "64", "--solver", "euler", "--steps", "2",
            "--epochs", "1", "--seed", "0", "--threads", "1", "--norm-first", "ln"]  # fmt: skip
    two = spawn_ranks([*args, "--out", str(tmp_path / "two")], world=2)
    assert two.returncodes == [0, 0], two.stderr
    one = spawn_ranks([*args, "--out", str(tmp_path / "one")], world=1)
    assert one.returncodes == [0], one.stderr
    r2 = json.loads((tmp_path / "two" / "report.json").read_text())
    r1 = json.loads((tmp_path / "one" / "report.json").read_text())
    assert r2["world_size"] == 2 and r2["results"]["iterations"] == r1["results"]["iterations"]
    a2 = r2["results"]["final_metrics"]["test_accuracy"]
    assert a2 == pytest.approx(r1["results"]["final_metrics"]["test_accuracy"], abs=0.01)
    w2 = load_model(tmp_path / "two" / "model.safetensors").model.state_dict()
    w1 = load_model(tmp_path / "one" / "model.safetensors").model.state_dict()
    for name, value in w1.items():
        if value.is_floating_point():
            assert torch.allclose(w2[name], value, atol=1e-4, rtol=1e-4), name
