"""Channel-level reduction (`reduce --mode channel`): groups, reconstruction identities, budgets."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from odekit.cli.app import app
from odekit.errors import LayerSelectionError, UsageError
from odekit.methods.evaluation import model_cost
from odekit.methods.ron.channel import (
    plan_channels,
    pod_basis,
    reconstruction,
    reduce_channels,
    select_channels,
)
from odekit.methods.ron.channel_budget import allocate, cost_model, measure_sensitivity
from odekit.methods.ron.channel_ops import ReadGrams
from odekit.methods.ron.compress import refuse_bigger
from odekit.methods.ron.settings import RonSettings, parse_target_flops

SHAPE = (3, 8, 8)
CPU = torch.device("cpu")


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(c, 4, 1)
        self.fc2 = nn.Conv2d(4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.fc2(nn.functional.silu(self.fc1(self.pool(x)))))


class TinyNet(nn.Module):
    """Conv/BN/ReLU, a residual block, an inverted residual with depthwise conv and SE, a flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU())
        self.c1 = nn.Sequential(nn.Conv2d(12, 10, 3, padding=1), nn.BatchNorm2d(10), nn.ReLU6())
        self.c2 = nn.Sequential(nn.Conv2d(10, 12, 3, padding=1), nn.BatchNorm2d(12))
        self.expand = nn.Sequential(nn.Conv2d(12, 24, 1), nn.BatchNorm2d(24), nn.Hardswish())
        self.dw = nn.Sequential(
            nn.Conv2d(24, 24, 3, padding=1, groups=24), nn.BatchNorm2d(24), nn.SiLU()
        )
        self.se = SE(24)
        self.project = nn.Conv2d(24, 8, 1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(8 * 16, 20)
        self.fc2 = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.c2(self.c1(x)))
        x = self.project(self.se(self.dw(self.expand(x))))
        x = self.pool(torch.relu(x)).flatten(1)
        return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
    """A pre-norm transformer MLP block: LayerNorm-ed residual stream, fc1 -> GELU -> fc2."""

    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, hidden), nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm(x))))


class TinyViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(24, 16)
        self.blocks = nn.Sequential(Block(), Block())
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(x.shape[0], 8, 24)
        return self.head(self.blocks(self.embed(tokens)).mean(1))


def _trained_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *SHAPE))
    return model.eval()


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    torch.manual_seed(0)
    return _trained_bn(TinyNet())


def _x(n: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def test_groups_tie_residuals_and_se_gates(tiny: nn.Module) -> None:
    plan = plan_channels(tiny, SHAPE)
    by_producer = {p: g for g in plan.groups for p in g.producers}
    # the residual add ties the stem's and c2's channels into one group with one selection
    assert by_producer["stem.0"] is by_producer["c2.0"] and by_producer["stem.0"].reducible
    # the SE gate's fc2 is a producer of the expansion group; the depthwise conv and its BN are channel-wise
    expansion = by_producer["expand.0"]
    assert "se.fc2" in expansion.producers and {"dw.0", "dw.1"} <= set(expansion.channelwise)
    assert {c.module for c in expansion.consumers} == {"se.fc1", "project"}
    # a flatten makes every channel 16 columns of fc1; the logits group reaches the output
    assert [c.block for c in by_producer["project"].consumers] == [16]
    assert not by_producer["fc2"].reducible and "output" in (by_producer["fc2"].blocked or "")


def test_full_width_reproduces_teacher(tiny: nn.Module) -> None:
    plan = plan_channels(tiny, SHAPE)
    widths = {g.index: g.channels for g in plan.reducible}
    built = reduce_channels(plan, _x(), RonSettings(mode="channel"), CPU, widths, recalibrate=False)
    x = _x(16, seed=5)
    with torch.no_grad():
        assert float((built.student(x) - tiny(x)).abs().max()) < 1e-4


class InPlace(nn.Module):
    """In-place ReLUs and an in-place residual add (``out += x``) between channel groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.c = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        out = self.b(x)
        out += x
        out = nn.functional.relu(out, inplace=True)
        return self.head(torch.relu(self.c(out)).flatten(1))


@pytest.mark.parametrize("model", ["tiny", "inplace"])
def test_resumed_runs_equal_runs_from_the_input(tiny: nn.Module, model: str) -> None:
    """Resuming each group's pass at the cut before its first changed layer changes nothing:
    the same sensitivities and the same student as running teacher and student from the input."""
    torch.manual_seed(0)
    teacher = tiny if model == "tiny" else _trained_bn(InPlace())
    results = []
    for resume in (False, True):
        plan = plan_channels(teacher, SHAPE)
        sens = measure_sensitivity(plan, _x(64), _x(40, seed=7), 16, CPU, resume)
        widths = {g.index: max(1, g.channels // 2) for g in plan.reducible}
        settings = RonSettings(mode="channel", batch_size=32)
        built = reduce_channels(plan, _x(64), settings, CPU, widths, resume=resume)
        with torch.no_grad():
            results.append((sens.curves, built.student(_x(8, seed=3))))
    flat = [[(k, w, loss) for k, pts in r[0].items() for w, loss in pts] for r in results]
    assert [p[:2] for p in flat[0]] == [p[:2] for p in flat[1]]
    assert [p[2] for p in flat[0]] == pytest.approx([p[2] for p in flat[1]], rel=1e-4, abs=1e-9)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-5)
    with torch.no_grad():  # the teacher is untouched by either
        assert torch.equal(teacher(_x(4)), teacher(_x(4)))


def test_transformer_mlp_hidden_is_reducible_stream_is_not() -> None:
    torch.manual_seed(0)
    vit = TinyViT().eval()
    plan = plan_channels(vit, SHAPE)
    reducible = {g.name for g in plan.reducible}
    assert reducible == {"blocks.0.fc1", "blocks.1.fc1"}
    stream = next(g for g in plan.groups if "embed" in g.producers)
    assert "LayerNorm" in (stream.blocked or "") or "output" in (stream.blocked or "")
    built = reduce_channels(
        plan, _x(), RonSettings(mode="channel"), CPU, {g.index: 16 for g in plan.reducible}
    )
    assert built.student.get_submodule("blocks.0.fc1").out_features == 16
    assert built.student.get_submodule("blocks.0.fc2").in_features == 16


def _grams(n: int = 400, c: int = 6, seed: int = 0) -> tuple[ReadGrams, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    zt = torch.randn(n, c, generator=g, dtype=torch.float64) @ torch.randn(
        c, c, generator=g, dtype=torch.float64
    )
    zs = zt + 0.1 * torch.randn(n, c, generator=g, dtype=torch.float64)
    grams = ReadGrams.zeros(c, CPU)
    grams.update(zs, zt)
    return grams, zs, zt


def test_interpolation_is_identity_on_chosen_channels() -> None:
    grams, _, _ = _grams()
    _, basis = pod_basis(grams.tt)
    keep = select_channels(grams.tt, 3, "maxvol")
    t = reconstruction(grams, keep, "interp", basis)
    assert torch.allclose(t[keep], torch.eye(3, dtype=t.dtype), atol=1e-10)


def test_least_squares_residual_is_orthogonal_to_kept_channels() -> None:
    grams, zs, zt = _grams()
    keep = select_channels(grams.tt, 4, "maxvol")
    t = reconstruction(grams, keep, "lsq")
    residual = zt - zs[:, keep] @ t.T
    scale = float(zs[:, keep].norm() * zt.norm())
    assert float((zs[:, keep].T @ residual).abs().max()) < 1e-5 * scale


@pytest.mark.parametrize("target", [0.5, 0.3])
def test_budget_met_within_three_percent(tiny: nn.Module, target: float) -> None:
    plan = plan_channels(tiny, SHAPE)
    model = cost_model(plan)
    sens = measure_sensitivity(plan, _x(64), _x(32, seed=7), 64, CPU)
    alloc = allocate(plan, model, sens, target)
    built = reduce_channels(plan, _x(64), RonSettings(mode="channel"), CPU, alloc.widths)
    teacher, student = model_cost(tiny, SHAPE), model_cost(built.student, SHAPE)
    assert student.flops == pytest.approx(alloc.flops)
    assert target * 0.97 <= student.flops / teacher.flops <= target
    assert student.params == pytest.approx(alloc.params)


def test_never_bigger_refusal(tiny: nn.Module) -> None:
    bigger = nn.Sequential(nn.Flatten(), nn.Linear(192, 4096), nn.Linear(4096, 5))
    with pytest.raises(LayerSelectionError, match="bigger than the teacher"):
        refuse_bigger(tiny, bigger, SHAPE, "region")
    refuse_bigger(tiny, tiny, SHAPE, "channel")  # the same size passes


def test_settings_read_budgets() -> None:
    assert parse_target_flops("2x") == 0.5 and parse_target_flops("0.25") == 0.25
    for bad in ("fast", "0x"):
        with pytest.raises(UsageError):
            parse_target_flops(bad)
    with pytest.raises(UsageError, match="fraction"):
        RonSettings(target_flops=1.5)
    with pytest.raises(UsageError, match="needs `layers`"):
        RonSettings(mode="region")


def test_cli_channel_mode_target(tmp_path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(app, [
        "reduce", "checkpoints/lenet5_digits.safetensors", "--mode", "channel", "--target-flops", "2x",
        "--fit-samples", "256", "--latency-batch", "32", "-o", str(out), "--json", "--threads", "1",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    r = json.loads((out / "report.json").read_text())["results"]
    assert r["mode"] == "channel" and r["reload_max_abs_diff"] < 1e-5
    assert (
        r["archive_flops"] == r["student"]["flops"]
        and r["archive_params"] == r["student"]["params"]
    )
    assert 0.97 * 0.5 <= r["student"]["flops"] / r["teacher"]["flops"] <= 0.5
    assert r["student"]["params"] < r["teacher"]["params"]
    # a registered teacher: safetensors + metadata (odekit.load), and the self-contained program
    assert r["student_checkpoint"] == str(out / "student.safetensors") and r["student_program"] == str(out / "student.pt2")
    assert r["program_reload_max_abs_diff"] < 1e-5
    # both allocations were built and scored on the validation split; the lower KL was kept
    candidates = r["budget"]["candidates"]
    assert {c["allocation"] for c in candidates} == {"greedy", "uniform"}
    kept = next(c for c in candidates if c["chosen"])
    assert kept["validation_mean_kl"] == min(c["validation_mean_kl"] for c in candidates)
    from odekit.api.reduce_channel import allocation_text

    assert allocation_text(candidates).startswith("widths: " + kept["allocation"])


def test_memory_estimate_and_allocation_failures_are_one_line() -> None:
    from odekit.methods.ron.memory import allocation_guard, check_memory

    with pytest.raises(UsageError, match=r"GiB.*available"):
        check_memory(1e18, "the region reduction", "use --mode channel", CPU)
    with (
        pytest.raises(UsageError, match="ran out of memory") as info,
        allocation_guard("build", "lower --batch-size"),
    ):
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory"
        )
    assert "lower --batch-size" in str(info.value)
    with pytest.raises(ValueError), allocation_guard("x", "y"):  # other errors pass unchanged
        raise ValueError("not memory")


@pytest.mark.slow
def test_resnet20_region_range_refused_auto_goes_channel(tmp_path) -> None:
    """issue 26: `--layers 8-13` on the shipped ResNet-20 built a 5 M-parameter region student."""
    ckpt = "checkpoints/resnet20_digits.safetensors"
    common = [
        "--layers",
        "8-13",
        "--fit-samples",
        "200",
        "--latency-batch",
        "8",
        "--json",
        "--threads",
        "1",
    ]
    region = CliRunner().invoke(
        app, ["reduce", ckpt, *common, "--mode", "region", "-o", str(tmp_path / "r")]
    )
    assert region.exit_code == 1 and "bigger than the teacher" in region.stderr
    auto = CliRunner().invoke(app, ["reduce", ckpt, *common, "-o", str(tmp_path / "a")])
    assert auto.exit_code == 0, auto.stderr
    r = json.loads(auto.stdout)["results"]
    assert r["mode"] == "channel" and r["student"]["params"] <= r["teacher"]["params"]
    assert r["student"]["flops"] <= r["teacher"]["flops"]


def test_info_lists_channel_groups() -> None:
    result = CliRunner().invoke(app, ["info", "checkpoints/resnet20_digits.safetensors", "--json"])
    assert result.exit_code == 0, result.output
    groups = json.loads(result.stdout)["channel_groups"]
    assert sum(g["reducible"] for g in groups) == 9  # the nine inner block channels
    assert all(g["blocked"] for g in groups if not g["reducible"])


def test_exported_flatten_feeds_linear_columns(tmp_path) -> None:
    """A .pt2 graph flattens with aten.flatten.using_ints: the conv before it stays reducible."""
    from odekit.io.exported import load_exported
    from odekit.models.channel_groups import channel_groups
    from odekit.models.graph import trace_graph

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8 * 16, 10))
    program = torch.export.export(model.eval(), (torch.randn(2, 1, 8, 8),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))  # fmt: skip
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_exported(tmp_path / "m.pt2")[0]
    groups = channel_groups(trace_graph(loaded, (1, 8, 8)), (1, 8, 8))
    conv = [g for g in groups if g.channels == 8]
    assert len(conv) == 1 and conv[0].reducible, [g.to_dict() for g in groups]


def test_exported_average_pools_pass_channels(tmp_path) -> None:
    """A .pt2 graph keeps average pools as aten ops (ResNet's head: adaptive_avg_pool2d ->
    flatten -> fc): the stream before them stays reducible, and at full width the student is the
    teacher."""
    from odekit.io.exported import load_exported

    torch.manual_seed(0)
    model = _trained_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5),
    ))  # fmt: skip
    program = torch.export.export(model, (torch.randn(2, *SHAPE),),
                                  dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=1024)},))  # fmt: skip
    torch.export.save(program, tmp_path / "m.pt2")
    loaded = load_exported(tmp_path / "m.pt2")[0]
    plan = plan_channels(loaded, SHAPE)
    assert sorted(g.channels for g in plan.reducible) == [8, 12], [g.to_dict() for g in plan.groups]
    widths = {g.index: g.channels for g in plan.reducible}
    built = reduce_channels(plan, _x(), RonSettings(mode="channel"), CPU, widths, recalibrate=False)
    with torch.no_grad():
        assert float((built.student(_x(16, seed=5)) - model(_x(16, seed=5))).abs().max()) < 1e-4
    half = {g.index: g.channels // 2 for g in plan.reducible}
    small = reduce_channels(plan, _x(), RonSettings(mode="channel"), CPU, half, recalibrate=False)
    assert small.student(_x(4)).shape == (4, 5)
