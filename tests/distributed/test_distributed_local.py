"""The single-process side of odekit.distributed: environment, sharding, world-of-one handle."""

from __future__ import annotations

import pytest
import torch

from odekit.distributed import (
    LaunchEnv,
    backend_for,
    init_distributed,
    read_launch_env,
    shard_bounds,
)
from odekit.errors import UsageError
from odekit.linalg.sketch import FrequentDirections, merge_across_ranks
from odekit.streaming.throughput import ThroughputMeter, measure_matmul_peak


def test_plain_run_is_rank_zero_of_one() -> None:
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.local_rank, env.distributed) == (0, 1, 0, False)


def test_torchrun_variables_are_read() -> None:
    env = read_launch_env(
        {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0", "MASTER_PORT": "29500",
         "TORCHELASTIC_USE_AGENT_STORE": "True", "TORCHELASTIC_RESTART_COUNT": "2"}
    )
    assert env == LaunchEnv(3, 8, 1, "node0", 29500, agent_store=True, restart=2)


@pytest.mark.parametrize(
    "environ",
    [
        {"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"},
        {"WORLD_SIZE": "two"},
        {"WORLD_SIZE": "2", "RANK": "0"},
        {"WORLD_SIZE": "0"},
    ],
)
def test_bad_launch_variables_are_usage_errors(environ: dict[str, str]) -> None:
    with pytest.raises(UsageError):
        read_launch_env(environ)


@pytest.mark.parametrize("n,world", [(0, 3), (10, 1), (10, 3), (7, 8), (600, 2), (1001, 64)])
def test_shards_are_disjoint_balanced_and_cover_the_split(n: int, world: int) -> None:
    bounds = [shard_bounds(n, r, world) for r in range(world)]
    covered = [i for start, stop in bounds for i in range(start, stop)]
    assert covered == list(range(n))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_backend_follows_the_device() -> None:
    assert backend_for(torch.device("cpu")) == "gloo"
    assert backend_for(torch.device("cuda", 0)) == "nccl"


def test_world_of_one_collectives_return_their_input() -> None:
    dist = init_distributed(torch.device("cpu"), env=LaunchEnv())
    try:
        t = torch.arange(6.0).reshape(2, 3)
        assert torch.equal(dist.all_reduce_sum(t), t)
        assert dist.all_reduce_sum(t) is not t
        assert dist.sum_numbers(2.0, 5.0) == [2.0, 5.0]
        assert dist.mean(6.0, 3.0) == 2.0
        assert [x.tolist() for x in dist.all_gather(t)] == [t.tolist()]
        assert torch.equal(dist.broadcast(t), t)
        assert dist.broadcast_object({"r": 4}) == {"r": 4}
        assert dist.shard(5) == range(5)
        assert dist.describe() == {"world_size": 1, "backend": None, "rank_device": "cpu"}
        assert dist.bytes_sent == 0
        fd = FrequentDirections(6, 3).update(torch.randn(10, 6, dtype=torch.float64))
        merged, info = merge_across_ranks(fd, dist)
        assert merged is fd
        assert (info.world_size, info.bytes_total, info.covariance_error_bound) == (1, 0, fd.delta)
        dist.fail("nothing to tell")  # no peers: a no-op
    finally:
        dist.close()


def test_throughput_reports_rate_and_fraction_of_peak() -> None:
    peak = measure_matmul_peak("cpu", size=128, repeats=2)
    assert peak > 0
    assert measure_matmul_peak("cpu", size=128, repeats=2) == peak  # cached
    meter = ThroughputMeter("stream", "cpu")
    with meter:
        meter.add(32)
        torch.mm(torch.randn(64, 64), torch.randn(64, 64))
    result = meter.result(flops_per_sample=2e6, peak_gflops=peak)
    assert result.samples == 32 and result.seconds > 0
    assert result.gflops == pytest.approx(32 / result.seconds * 2e6 / 1e9)
    assert result.fraction_of_peak == pytest.approx(result.gflops / peak)
    assert meter.result(1.0).fraction_of_peak is None
    assert set(result.to_dict()) >= {"samples_per_s", "model_gflops_per_s", "fraction_of_peak"}


def test_commands_that_do_not_shard_refuse_several_ranks(tmp_path) -> None:
    from typer.testing import CliRunner

    from odekit.cli.app import app

    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app, ["smoothness-check", "checkpoints/odenet4_digits_euler.safetensors", "--out", str(out)], env=env
    )
    assert result.exit_code == 1
    assert "does not split its work over ranks (2 were launched)" in result.stderr
    assert not out.exists()
    # rank 1 stays silent about the same error
    result = CliRunner().invoke(
        app, ["smoothness-check", "checkpoints/odenet4_digits_euler.safetensors", "--out", str(out)],
        env={**env, "RANK": "1", "LOCAL_RANK": "1"},
    )
    assert result.exit_code == 1 and result.stderr == ""
