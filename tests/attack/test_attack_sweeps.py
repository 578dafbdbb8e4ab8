"""Budget sweeps from one call, the Distance objects, the stronger universal attacks (as+uap,
as-k, targeted), confidence intervals and settings built from options by field name."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from odekit.errors import UsageError
from odekit.methods.attacks import (
    L2,
    LINF,
    TNORM,
    ActiveSubspaceAttack,
    ActiveSubspaceKAttack,
    ActiveSubspaceKSettings,
    ActiveSubspaceSettings,
    ADefAttack,
    ASUAPAttack,
    ASUAPSettings,
    DeepFoolAttack,
    DeepFoolSettings,
    RandomAttack,
    UAPAttack,
    UAPSettings,
    UniversalSettings,
    attack_success,
    evaluate_adversarial,
    lp_norm,
)
from odekit.methods.attacks.plan import build_plan, parse_budgets, parse_seeds
from odekit.stats import Proportion, spread, wilson_interval


def test_wilson_interval_known_values():
    # textbook values (Newcombe 1998): 5 of 10 -> [0.2366, 0.7634]; 0 of 10 -> [0, 0.2775]
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(0, 0) == (0.0, 1.0)
    low, high = wilson_interval(170, 360)
    assert low < 170 / 360 < high and high - low == pytest.approx(0.103, abs=2e-3)
    assert Proportion(3, 4).rate == 0.75
    with pytest.raises(UsageError):
        wilson_interval(5, 4)
    s = spread([0.2, 0.4])
    assert s["mean"] == pytest.approx(0.3) and s["std"] == pytest.approx(math.sqrt(0.02))


def test_distances_measure_and_project():
    v = torch.tensor([[3.0, 4.0], [0.3, -0.1]])
    assert L2.norms(v).tolist() == pytest.approx([5.0, math.hypot(0.3, 0.1)])
    assert LINF.norms(LINF.project(v, 0.2)).max() <= 0.2 + 1e-7
    field = torch.zeros(1, 2, 3, 3)
    field[0, :, 1, 1] = torch.tensor([3.0, 4.0])
    field[0, 0, 0, 0] = 1.0
    capped = TNORM.project(field, 2.0)
    assert float(TNORM.norms(capped)[0]) == pytest.approx(2.0)
    assert float(capped[0, 0, 0, 0]) == pytest.approx(1.0)  # short displacements are kept
    assert L2.largest((1, 28, 28)) == pytest.approx(28.0) and LINF.largest((3, 8, 8)) == 1.0
    with pytest.raises(UsageError, match="larger than any"):
        L2.check_budgets([1e300], (1, 8, 8), "--delta")
    with pytest.raises(UsageError, match="positive and finite"):
        TNORM.check_budgets([float("nan")], (1, 8, 8), "--eps")


def test_as_sweep_fits_once_scales_and_is_monotone(small_mlp, digits_pixels):
    x = digits_pixels[0][:80]
    attack = ActiveSubspaceAttack(ActiveSubspaceSettings(max_iter=8))
    budgets = [0.3, 0.6, 1.2]
    results = attack(small_mlp, x, None, budgets, seed=0)
    assert [r.budget for r in results] == budgets
    assert len({r.shared_seconds for r in results}) == 1 and results[0].shared_seconds > 0
    for r, eps in zip(results, budgets, strict=True):
        assert lp_norm(r.v, "2") <= eps * (1 + 1e-5)
    rates = [r.fooling_rate_fit for r in results]
    assert all(b >= a for a, b in itertools.pairwise(rates)) and rates[-1] > rates[0]
    # the largest budget is the fit itself: the same vector as a single-budget call
    single = attack(small_mlp, x, None, 1.2, seed=0)
    assert torch.allclose(single.v, results[-1].v)
    # with no refinement, smaller budgets are exactly the scaled vector
    plain = ActiveSubspaceAttack(ActiveSubspaceSettings(max_iter=8, sweep_refine=0))
    scaled = plain(small_mlp, x, None, [0.6, 1.2], seed=0)
    assert torch.allclose(scaled[0].v, scaled[1].v * 0.5, atol=1e-6)


def test_random_direction_is_shared_and_uap_reruns(small_mlp, digits_pixels):
    x = digits_pixels[0][:40]
    rand = RandomAttack(UniversalSettings())(small_mlp, x, None, [0.5, 2.0], seed=3)
    assert lp_norm(rand[0].v, "2") == pytest.approx(0.5, rel=1e-5)
    cosine = float(torch.nn.functional.cosine_similarity(rand[0].v.flatten(), rand[1].v.flatten(), 0))
    assert cosine == pytest.approx(1.0, abs=1e-6)
    uap = UAPAttack(UAPSettings(max_passes=1))(small_mlp, x, None, [0.5, 1.0], seed=0)
    assert all(r.shared_seconds == 0 and r.seconds > 0 for r in uap)
    assert [lp_norm(r.v, "2") <= r.budget * (1 + 1e-5) for r in uap] == [True, True]


def test_minimization_attack_runs_once_and_clips_per_budget(small_mlp, digits_pixels):
    _, _, xt, yt = digits_pixels
    x, y = xt[:60], yt[:60]
    attack = DeepFoolAttack(DeepFoolSettings(norm="2", backend="torch", steps=10))
    sweep = attack(small_mlp, x, y, [0.2, 0.5, 1.0])
    assert len({r.shared_seconds for r in sweep}) == 1
    robust = [evaluate_adversarial(small_mlp, x, y, r.x_adv)["robust_accuracy"] for r in sweep]
    assert robust[0] >= robust[1] >= robust[2]
    assert all(float(r.sizes.max()) <= r.budget * (1 + 1e-5) for r in sweep)
    # clipping one run per budget equals running at that budget alone
    assert torch.allclose(attack(small_mlp, x, y, 0.5).x_adv, sweep[1].x_adv, atol=1e-6)
    assert ADefAttack.fixed_distance is TNORM and not ADefAttack.reruns_per_budget


@pytest.mark.parametrize("target", [None, 3])
@pytest.mark.parametrize("norm,delta", [("2", 1.0), ("inf", 0.1)])
@pytest.mark.parametrize("name", ["as+uap", "as-k"])
def test_refinements_respect_budget_and_fool_at_least_as_many_as_as(
    small_mlp, digits_pixels, name, norm, delta, target
):
    x = digits_pixels[0][:60]
    common = {"norm": norm, "delta": delta, "max_iter": 6, "target": target}
    plain = ActiveSubspaceAttack(ActiveSubspaceSettings(**common))(small_mlp, x, seed=0)
    if name == "as+uap":
        attack = ASUAPAttack(ASUAPSettings(max_passes=2, **common))
    else:
        attack = ActiveSubspaceKAttack(ActiveSubspaceKSettings(k=4, subspace_steps=5, **common))
    result = attack(small_mlp, x, seed=0)
    assert lp_norm(result.v, norm) <= delta * (1 + 1e-5)
    assert float(result.v.abs().max()) <= 1.0
    assert result.fooling_rate_fit >= plain.fooling_rate_fit
    assert result.extra["fooling_rate_fit_as"] == pytest.approx(plain.fooling_rate_fit)


def test_targeted_success_counts_only_other_classes(small_mlp, digits_pixels):
    x = digits_pixels[0][:100]
    clean = small_mlp(x).argmax(1)
    targeted = ActiveSubspaceAttack(ActiveSubspaceSettings(delta=2.0, max_iter=8, target=3))
    rand = RandomAttack(UniversalSettings(delta=2.0, target=3))
    hit = targeted(small_mlp, x, seed=0)
    assert hit.fooling_rate_fit > rand(small_mlp, x, seed=0).fooling_rate_fit + 0.1
    pred = small_mlp((x + hit.v).clamp(0, 1)).argmax(1)
    success = attack_success(pred, clean, 3)
    assert success.n == int((clean != 3).sum()) and success.rate == pytest.approx(hit.fooling_rate_fit)


def test_plan_builds_settings_by_field_name():
    plan = build_plan("as-k", {"norm": "linf", "delta": [0.1, 0.05], "k": 8, "steps": 3,
                               "target": 2, "gamma": 0.25})
    s = plan.attack.settings
    assert (s.k, s.norm, s.delta, s.target, s.gamma) == (8, "inf", 0.1, 2, 0.25)
    assert plan.budgets == [0.05, 0.1] and plan.universal
    adef = build_plan("adef", {"norm": "inf", "steps": 7, "sigma": 0.5})
    assert adef.norm == "T" and adef.budgets == [1.0] and adef.attack.settings.steps == 7
    assert build_plan("pgd", {"norm": "2"}).budgets == [0.5]
    with pytest.raises(UsageError, match="`target` is for universal"):
        build_plan("fgsm", {"target": 1})
    with pytest.raises(UsageError, match="`eps` is for per-sample"):
        build_plan("uap", {"eps": [0.1]})
    assert parse_budgets("3, 1,2,2") == [1.0, 2.0, 3.0]
    assert parse_seeds("0,2,2,1") == [0, 2, 1]
    for bad in ("1e999", "nan", "-1", ""):
        with pytest.raises(UsageError):
            parse_budgets(bad, "--delta")
    with pytest.raises(UsageError):
        parse_seeds("1,x")
