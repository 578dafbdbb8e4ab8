"""Channel concatenations in `reduce --mode channel`: one group over C1 + C2 + ... channels whose
parts (the inputs' producers and channel-wise ops) keep their share of one selection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from odekit.methods.evaluation import model_cost
from odekit.methods.ron.channel import (
    plan_channels,
    reconstruction,
    reduce_channels,
    select_channels,
)
from odekit.methods.ron.channel_budget import (
    allocate,
    cost_model,
    measure_sensitivity,
    teacher_grams,
)
from odekit.methods.ron.channel_ops import (
    PrefixRunner,
    ReadGrams,
    apply_selection,
    channel_rows,
)
from odekit.methods.ron.settings import RonSettings
from odekit.models.channel_groups import ChannelGroup, split_width

SHAPE = (3, 8, 8)
CPU = torch.device("cpu")


def _cbr(cin: int, cout: int, k: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class TwoBranch(nn.Module):
    """Two conv branches -> cat -> BN -> ReLU -> conv; a nested cat added to a full-width conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, 3)
        self.a = nn.Conv2d(8, 6, 3, padding=1)
        self.b = _cbr(8, 10)
        self.bn = nn.BatchNorm2d(16)
        self.mid = _cbr(16, 12, 3)
        self.c, self.d, self.e = nn.Conv2d(12, 4, 1), nn.Conv2d(12, 6, 3, padding=1), _cbr(12, 5)
        self.skip = nn.Conv2d(12, 15, 1)
        self.head = nn.Linear(15, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.mid(torch.relu(self.bn(torch.cat([self.a(x), self.b(x)], dim=1))))
        y = torch.cat([torch.cat([self.c(x), self.d(x)], 1), self.e(x)], 1) + self.skip(x)
        return self.head(torch.relu(y).mean((2, 3)))


class Inception(nn.Module):
    def __init__(self, cin: int, widths: tuple[int, int, int, int]) -> None:
        super().__init__()
        w1, w3, w5, wp = widths
        self.b1 = _cbr(cin, w1)
        self.b2 = nn.Sequential(_cbr(cin, 6), _cbr(6, w3, 3))
        self.b3 = nn.Sequential(_cbr(cin, 4), _cbr(4, w5, 3))
        self.b4 = nn.Sequential(nn.MaxPool2d(3, 1, 1), _cbr(cin, wp))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.b1(x), self.b2(x), self.b3(x), self.b4(x)], 1)


class TinyInception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 12, 3)
        self.i1, self.i2 = Inception(12, (6, 8, 4, 4)), Inception(22, (8, 6, 6, 4))
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(24 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(self.i2(self.pool(self.i1(self.stem(x))))).flatten(1))


class TinyDense(nn.Module):
    """DenseNet: every layer's output joins every later concatenation."""

    def __init__(self, c0: int = 8, growth: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c0, 3, padding=1)
        widths = [c0 + i * growth for i in range(3)]
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), _cbr(c, 8), nn.Conv2d(8, growth, 3, padding=1))
            for c in widths
        )
        self.bn = nn.BatchNorm2d(c0 + 3 * growth)
        self.fc = nn.Linear(c0 + 3 * growth, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for layer in self.layers:
            features.append(layer(torch.cat(features, 1)))
        return self.fc(torch.relu(self.bn(torch.cat(features, 1))).mean((2, 3)))


def _trained_bn(model: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(32, *SHAPE))
    return model.eval()


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return _trained_bn(cls())


def _x(n: int = 96, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


def _by_producer(groups: list[ChannelGroup]) -> dict[str, ChannelGroup]:
    return {p: g for g in groups for p in g.producers}


def test_split_width_keeps_one_channel_per_part() -> None:
    assert split_width([6, 10], 16) == [6, 10] and split_width([6, 10], 8) == [3, 5]
    assert split_width([1, 30, 1], 4) == [1, 2, 1]  # never an empty part
    assert split_width([4, 4, 4], 1) == [1, 1, 1]  # clamped up to one per part
    for width in range(1, 23):
        kept = split_width([3, 7, 12], width)
        assert sum(kept) == max(width, 3) and all(1 <= k <= n for k, n in zip(kept, [3, 7, 12], strict=True))


def test_concat_is_one_group_with_parts() -> None:
    plan = plan_channels(_model(TwoBranch), SHAPE)
    by = _by_producer(plan.groups)
    first = by["a"]
    assert first is by["b.0"] and first.reducible and first.channels == 16
    assert [(p.offset, p.channels, p.producers) for p in first.parts] == [(0, 6, ["a"]), (6, 10, ["b.0"])]
    assert "b.1" in first.channelwise and "bn" in first.channelwise
    assert [c.module for c in first.consumers] == ["mid.0"]
    # nested concatenation plus a full-width residual producer: one group, three parts
    second = by["skip"]
    assert second is by["c"] is by["d"] is by["e.0"] and second.reducible
    assert [(p.offset, p.channels) for p in second.parts] == [(0, 4), (4, 6), (10, 5)]
    assert second.span("skip") == (0, 15) and second.span("e.1") == (10, 5)
    assert second.to_dict()["parts"][2]["producers"] == ["e.0"]


@pytest.mark.parametrize("cls", [TwoBranch, TinyInception, TinyDense])
def test_full_width_reproduces_teacher(cls: type[nn.Module]) -> None:
    model = _model(cls)
    plan = plan_channels(model, SHAPE)
    widths = {g.index: g.channels for g in plan.reducible}
    built = reduce_channels(plan, _x(), RonSettings(mode="channel"), CPU, widths, recalibrate=False)
    x = _x(16, seed=5)
    with torch.no_grad():
        assert float((built.student(x) - model(x)).abs().max()) < 2e-5


@pytest.mark.parametrize("cls", [TwoBranch, TinyInception])
@pytest.mark.parametrize("selection", ["maxvol", "l1"])
def test_reduced_student_matches_cost_model(cls: type[nn.Module], selection: str) -> None:
    model = _model(cls)
    plan = plan_channels(model, SHAPE)
    concat = [g for g in plan.reducible if g.parts]
    assert concat
    widths = {g.index: max(1, g.channels // 3) for g in plan.reducible}
    built = reduce_channels(plan, _x(), RonSettings(mode="channel"), CPU, widths, selection=selection)
    flops, params = cost_model(plan).cost(widths)
    student = model_cost(built.student, SHAPE)
    assert student.flops == pytest.approx(flops) and student.params == pytest.approx(params)
    for g in concat:  # every part keeps its share (at least one channel)
        kept = dict(zip(g.segments, g.segment_widths(widths[g.index]), strict=True))
        for part in g.parts:
            share = sum(k for (a, _), k in kept.items() if part.offset <= a < part.offset + part.channels)
            for name in part.producers:
                assert built.student.get_submodule(name).out_channels == share
        for c in g.consumers:
            weight = built.student.get_submodule(c.module).weight
            assert weight.shape[1] == sum(kept.values()) * c.block


def test_inception_concats_are_reducible() -> None:
    plan = plan_channels(_model(TinyInception), SHAPE)
    by = _by_producer(plan.groups)
    i1 = by["i1.b1.0"]
    assert i1 is by["i1.b2.1.0"] is by["i1.b3.1.0"] is by["i1.b4.1.0"] and i1.reducible
    assert [p.channels for p in i1.parts] == [6, 8, 4, 4] and len(i1.segments) == 4
    assert {c.module for c in i1.consumers} == {"i2.b1.0", "i2.b2.0.0", "i2.b3.0.0", "i2.b4.1.0"}
    assert by["i2.b1.0"].reducible and [c.block for c in by["i2.b1.0"].consumers] == [4]
    assert sum(1 for g in plan.groups if g.parts) == 2


@pytest.mark.parametrize("cls", [TwoBranch, TinyInception])
def test_budget_met_within_three_percent(cls: type[nn.Module]) -> None:
    model = _model(cls)
    plan = plan_channels(model, SHAPE)
    cm = cost_model(plan)
    sens = measure_sensitivity(plan, _x(64), _x(32, seed=7), 64, CPU)
    alloc = allocate(plan, cm, sens, 0.5)
    built = reduce_channels(plan, _x(64), RonSettings(mode="channel"), CPU, alloc.widths)
    teacher, student = model_cost(model, SHAPE), model_cost(built.student, SHAPE)
    assert student.flops == pytest.approx(alloc.flops) and student.params == pytest.approx(alloc.params)
    assert 0.5 * 0.97 <= student.flops / teacher.flops <= 0.5
    report = {g.index: g for g in built.groups}
    assert all(report[g.index].reducible for g in plan.groups if g.parts)  # listed once, as one group


def test_least_squares_residual_is_orthogonal_to_kept_channels() -> None:
    plan = plan_channels(_model(TinyInception), SHAPE)
    group = next(g for g in plan.reducible if g.parts)
    read = group.reads[0]
    grams = teacher_grams(plan, _x(), 64, CPU)[group.index]
    tt = grams[read]
    keep = select_channels(tt, 7, "maxvol", group=group)
    assert keep.numel() == 7 and all(
        int(((keep >= a) & (keep < b)).sum()) == k
        for (a, b), k in zip(group.segments, group.segment_widths(7), strict=True)
    )
    t = reconstruction(ReadGrams(tt, tt, tt), keep, "lsq")
    z = channel_rows(PrefixRunner(plan.gm).values(_x(), [read])[read], 1).double()
    residual = z - z[:, keep] @ t.T
    assert float((z[:, keep].T @ residual).abs().max()) < 1e-5 * float(z[:, keep].norm() * z.norm())


def test_empty_part_is_refused() -> None:
    plan = plan_channels(_model(TwoBranch), SHAPE)
    group = _by_producer(plan.groups)["a"]
    keep = torch.arange(6, 16)  # every channel of the first part dropped
    with pytest.raises(ValueError, match="at least one channel"):
        apply_selection(plan.gm, group, keep, {r: torch.zeros(16, 10) for r in group.reads})


def test_densenet_concats_stay_blocked_with_the_reason() -> None:
    plan = plan_channels(_model(TinyDense), SHAPE)
    by = _by_producer(plan.groups)
    for name in ("stem", "layers.0.3", "layers.1.3"):  # joined by several concatenations
        assert not by[name].reducible and "other concatenations" in (by[name].blocked or "")
    cats = [g for g in plan.groups if not g.producers]
    assert cats and all("other concatenations join too" in (g.blocked or "") for g in cats)
    assert all(g.name.startswith("cat") for g in cats)
    # the bottlenecks (1x1 conv -> BN -> ReLU -> 3x3 conv) stay reducible
    assert {g.name for g in plan.reducible} == {f"layers.{i}.2.0" for i in range(3)}
