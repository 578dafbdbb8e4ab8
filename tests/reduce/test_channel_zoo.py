"""`reduce --target-flops 0.5` on the architectures of issue 26 (untrained weights: the mechanics)."""

from __future__ import annotations

import pytest
import torch

from odekit.io.datasets import Split
from odekit.methods.evaluation import model_cost
from odekit.methods.ron.channel_build import build_channel_student
from odekit.methods.ron.settings import RonSettings

pytestmark = pytest.mark.slow
SHAPE = (3, 32, 32)


def _model(name: str) -> torch.nn.Module:
    torchvision = pytest.importorskip("torchvision")
    if name == "convnext_atto":
        return pytest.importorskip("timm").create_model("convnext_atto", num_classes=10)
    if name == "vit":
        return torchvision.models.VisionTransformer(
            image_size=32, patch_size=4, num_layers=4, num_heads=4, hidden_dim=128, mlp_dim=256, num_classes=10
        )
    if name == "googlenet":  # Inception concatenations: one group each, a part per branch
        return torchvision.models.googlenet(num_classes=10, aux_logits=False, init_weights=True)
    return getattr(torchvision.models, name)(num_classes=10)


@pytest.mark.parametrize(
    "name", ["resnet18", "mobilenet_v2", "efficientnet_b0", "vit", "convnext_atto", "googlenet"]
)
def test_half_the_flops_gives_a_plain_smaller_module(name: str) -> None:
    torch.manual_seed(0)
    model = _model(name).eval()
    x, y = torch.randn(96, *SHAPE), torch.randint(0, 10, (96,))
    # the ViT's attention projections and products sit on the LayerNorm-ed stream: only its MLPs shrink
    target = 0.7 if name == "vit" else 0.5
    settings = RonSettings(mode="channel", target_flops=target, batch_size=64)
    built = build_channel_student(model, SHAPE, Split(x[:64], y[:64]), Split(x[64:], y[64:]), settings, torch.device("cpu"))
    teacher, student = model_cost(model, SHAPE), model_cost(built.student, SHAPE)
    assert 0.97 * target <= student.flops / teacher.flops <= target
    assert student.params < teacher.params
    program = torch.export.export(built.student, (torch.zeros(2, *SHAPE),))
    with torch.no_grad():
        assert torch.allclose(program.module()(x[:2]), built.student(x[:2]), atol=1e-4)


def test_densenet_concatenations_stay_blocked_bottlenecks_reduce() -> None:
    """DenseNet: a layer's output joins every later concatenation (one selection each would be
    needed), so the concatenations stay at full width; the 1x1 -> 3x3 bottlenecks reduce."""
    from odekit.methods.ron.channel import plan_channels

    torch.manual_seed(0)
    plan = plan_channels(_model("densenet121").eval(), SHAPE)
    assert len(plan.reducible) == 58 and not any(g.parts for g in plan.reducible)
    cats = [g for g in plan.groups if not g.producers]
    assert len(cats) == 62 and all("other concatenations join too" in (g.blocked or "") for g in cats)
