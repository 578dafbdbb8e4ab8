"""Device paths (sketches and collectives on CUDA, nccl): skipped without a GPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from odekit.distributed import LaunchEnv, init_distributed
from odekit.linalg.sketch import FrequentDirections, merge_across_ranks
from odekit.streaming.throughput import ThroughputMeter, measure_matmul_peak

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _worker  # noqa: E402
from rank_spawner import spawn_ranks  # noqa: E402

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_sketch_and_throughput_stay_on_the_device() -> None:
    dist = init_distributed(torch.device("cuda"), env=LaunchEnv())
    try:
        a = _worker.test_matrix().cuda()
        fd = FrequentDirections(_worker.D, _worker.ELL, device="cuda")
        with ThroughputMeter("stream", "cuda") as meter:
            for i in range(0, a.shape[0], _worker.BATCH):
                fd.update(a[i : i + _worker.BATCH])
                meter.add(_worker.BATCH)
        merged, _ = merge_across_ranks(fd, dist)
        assert merged is fd and fd.sketch.device.type == "cuda"
        err = a.T @ a - fd.sketch.T @ fd.sketch
        assert float(torch.linalg.eigvalsh(err)[-1]) <= fd.delta * (1 + 1e-9)
        peak = measure_matmul_peak("cuda")
        result = meter.result(2.0 * _worker.D * _worker.ELL, peak)
        assert peak > 100 and 0 < result.fraction_of_peak < 1.5  # type: ignore[operator]
    finally:
        dist.close()


def test_ron_student_on_the_device_matches_the_cpu_one() -> None:
    _, predictions = _worker.ron_student(None)
    from odekit.io.checkpoints import load_model
    from odekit.io.datasets import dataset_for_model
    from odekit.methods.ron import RonSettings, build_student

    loaded = load_model(_worker.ROOT / "checkpoints" / "lenet300_digits.safetensors")
    data = dataset_for_model(loaded.meta.input_shape, loaded.meta.normalization, loaded.meta.dataset)
    settings = RonSettings(layers="1-2", rank="32,24", sketch_size=64, batch_size=100)
    on_gpu = build_student(loaded.model, loaded.meta.arch, loaded.meta.args, data.input_shape,
                           data.train.x[:600], settings, device="cuda")  # fmt: skip
    assert on_gpu.throughput is not None and on_gpu.throughput.fraction_of_peak is not None
    with torch.no_grad():
        p = on_gpu.student.eval()(data.test.x.cuda()).argmax(1).cpu()
    assert float((p == predictions).double().mean()) >= 0.99


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_two_ranks_on_two_gpus_with_nccl(tmp_path: Path) -> None:
    run = spawn_ranks([str(HERE / "_worker.py"), "merge", str(tmp_path)], world=2,
                      extra_env={"WORKER_DEVICE": "cuda"})  # fmt: skip
    assert run.returncodes == [0, 0], run.stderr
    result = torch.load(tmp_path / "result.pt", weights_only=True, map_location="cpu")
    assert result["n_rows"] == _worker.N and result["world"] == 2
