"""Graph normalisation, tracing errors and graph cuts on models odekit did not build."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from odekit.errors import UnsupportedModelError
from odekit.io.exported import load_exported, save_exported
from odekit.methods.asnet import GraphModel, cut_model
from odekit.methods.ron import RonSettings, build_student
from odekit.models.graph import normalize_graph, trace_graph
from odekit.models.layers import layer_table


class SmallVGG(nn.Module):
    """kuangliu style: biased convs, BatchNorm, in-place ReLU, max-pools, ``view(size(0), -1)``."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for v in (6, "M", 8, "M"):
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
                c = int(v)
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x):
        out = self.features(x)
        out = out.view(out.size(0), -1)
        return self.classifier(out)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return F.relu(out)


class SmallResNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.block = Block(4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        h = self.block(F.relu(self.stem(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1))


SHAPE = (3, 8, 8)


def _randomise_bn(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
    return model.eval()


def _exported(model: nn.Module, tmp_path) -> nn.Module:
    path = save_exported(tmp_path / "m.pt2", model, SHAPE, None)
    return load_exported(path)[0]


def _decomposed(model: nn.Module, tmp_path) -> nn.Module:
    """As saved after ``run_decompositions()``: convolution, addmm(permute(W)), tuple-valued
    batch norm and max-pool-with-indices."""
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(model, (torch.zeros(2, *SHAPE),), dynamic_shapes=({0: batch},))
    torch.export.save(program.run_decompositions(), str(tmp_path / "d.pt2"))
    return torch.export.load(str(tmp_path / "d.pt2")).module()


@pytest.mark.parametrize(
    ("cls", "decompose"),
    [(SmallVGG, False), (SmallResNet, False), (SmallVGG, True), pytest.param(SmallResNet, True, marks=pytest.mark.slow)],
)
def test_exported_graph_is_lifted_to_modules_with_the_same_outputs_and_layer_table(cls, decompose, tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(cls())
    program = _decomposed(model, tmp_path) if decompose else _exported(model, tmp_path)
    gm = normalize_graph(program, SHAPE)  # type: ignore[arg-type]
    kinds = {type(m).__name__ for m in gm.modules()}
    assert {"Conv2d", "BatchNorm2d", "Linear"} <= kinds
    assert not any(
        n.op == "call_function" and any(op in str(n.target) for op in ("conv", "linear", "addmm", "batch_norm", "max_pool"))
        for n in gm.graph.nodes
    )
    x = torch.randn(5, *SHAPE)
    with torch.no_grad():
        assert float((gm(x) - model(x)).abs().max()) < 1e-5
    # the layer table of the aten graph lists the module's layers, by name, with the same FLOPs
    want, got = layer_table(model, SHAPE), layer_table(program, SHAPE)
    assert [(la.name, la.flops, la.params) for la in got.layers] == [(la.name, la.flops, la.params) for la in want.layers]
    assert (got.flops, got.params) == (want.flops, want.params)


class FunctionalWeights(nn.Module):
    """Layers as F.conv2d / F.linear calls on the model's own parameters."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv_w = nn.Parameter(0.3 * torch.randn(4, 3, 3, 3, generator=g))
        self.conv_b = nn.Parameter(0.1 * torch.randn(4, generator=g))
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x):
        h = F.max_pool2d(F.relu(F.conv2d(x, self.conv_w, self.conv_b, padding=1)), 2)
        return self.fc(h.flatten(1))


def test_functional_layers_are_listed_and_reducible(tmp_path) -> None:
    model = FunctionalWeights().eval()
    table = layer_table(model, SHAPE)
    assert [(la.type, la.flops) for la in table.layers] == [("Conv2d", 2 * 4 * 8 * 8 * 3 * 9), ("Linear", 2 * 64 * 5)]
    assert table.flops == sum(la.flops for la in table.layers)
    exported = layer_table(_exported(model, tmp_path), SHAPE)
    assert [(la.type, la.flops) for la in exported.layers] == [(la.type, la.flops) for la in table.layers]
    x = torch.randn(400, *SHAPE)
    student = build_student(model, "x", {}, SHAPE, x, RonSettings(layers="1-1", rank="64", sketch_size=64)).student
    with torch.no_grad():  # full rank of the 64-dim pooled state: the student is the teacher
        assert float((student(x[:32]) - model(x[:32])).abs().max()) < 1e-4


def test_ron_on_a_decomposed_pt2_graph_matches_the_module(tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(SmallVGG())
    x = torch.randn(300, *SHAPE)
    settings = RonSettings(layers="1-2", rank="24")
    a = build_student(model, "x", {}, SHAPE, x, settings)
    b = build_student(_decomposed(model, tmp_path), "x", {}, SHAPE, x, settings)
    assert a.ranks == b.ranks == [24, 24]
    with torch.no_grad():
        assert float((a.student(x[:16]) - b.student(x[:16])).abs().max()) < 1e-4


def test_untraceable_forward_names_the_user_line() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = self.fc(x)
            if h.sum() > 0:  # data-dependent branch
                return h
            return -h

    with pytest.raises(UnsupportedModelError) as err:
        trace_graph(Branchy(), (4,), what="RON")
    line = str(err.value)
    assert "\n" not in line
    assert "test_graph_normalize.py:" in line and "if h.sum() > 0" in line
    assert "control flow" in line


def test_shape_dependent_branch_falls_back_to_torch_export() -> None:
    class ShapeBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            if x.dim() == 4:  # fx cannot follow this, torch.export can
                x = x.flatten(1)
            return self.fc(F.relu(x))

    model = ShapeBranch().eval()
    gm = trace_graph(model, (3, 2, 2))
    x = torch.randn(4, 3, 2, 2)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-6)
    assert [layer.name for layer in layer_table(gm, (3, 2, 2)).layers] == ["fc"]


def test_graph_cut_inside_a_residual_block_carries_the_skip_tensor(tmp_path) -> None:
    torch.manual_seed(0)
    model = _randomise_bn(SmallResNet())
    assert isinstance(cut_model(model, SHAPE), GraphModel)  # not a plain chain
    x = torch.randn(4, *SHAPE)
    for teacher in (model, _exported(model, tmp_path)):
        graph = GraphModel(teacher, SHAPE)
        assert graph.analysable_layers() == [1, 2, 3]
        sizes = {}
        for index in graph.analysable_layers():
            cut = graph.cut(index)
            sizes[index] = (cut.features, len(cut.frontier or []))
            with torch.no_grad():
                assert float((graph.post_model(cut)(graph.pre_model(cut)(x)) - model(x)).abs().max()) < 1e-5
        # after block.conv1 the block input (the skip tensor) crosses the cut with relu(bn1);
        # after block.conv2 the cut runs on through the sum, ReLU and pooling up to fc
        assert sizes == {1: (256, 1), 2: (512, 2), 3: (4, 1)}


def test_graph_cut_asnet_of_a_registered_residual_model_rebuilds_from_its_args() -> None:
    from odekit.methods.asnet import build_asnet
    from odekit.models.registry import build_model

    args = {"num_classes": 10, "width": 0.25, "in_channels": 1}
    teacher = build_model("resnet20", args).eval()
    graph = GraphModel(teacher, (1, 16, 16))
    cut = graph.cut("conv4")  # inside the second block: the block input crosses the cut
    assert cut.node is not None and cut.frontier is not None and len(cut.frontier) == 2
    rebuilt = build_asnet(
        "resnet20", args, 4, cut.end, cut.features, 3, 2, 10, node=cut.node, input_shape=[1, 16, 16]
    ).eval()
    rebuilt.pre.load_state_dict(graph.pre_model(cut).state_dict())
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(rebuilt.pre(x), graph.pre_model(cut)(x))
