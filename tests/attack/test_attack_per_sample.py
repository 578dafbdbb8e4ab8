"""Per-sample attacks: budgets, bounds, foolbox agreement, ADef geometry."""

from __future__ import annotations

import pytest
import torch

from odekit.errors import UsageError
from odekit.methods.attacks import (
    ADefAttack,
    ADefSettings,
    DeepFoolAttack,
    DeepFoolSettings,
    FGSMAttack,
    FGSMSettings,
    PGDAttack,
    PGDSettings,
    deform,
    evaluate_adversarial,
    lp_norms,
    t_norm,
)


@pytest.mark.parametrize(
    "attack,eps",
    [
        (FGSMAttack(FGSMSettings(norm="inf")), 0.1),
        (FGSMAttack(FGSMSettings(norm="2")), 0.5),
        (PGDAttack(PGDSettings(norm="inf", steps=5, restarts=2)), 0.1),
        (PGDAttack(PGDSettings(norm="2", steps=5)), 0.5),
        (DeepFoolAttack(DeepFoolSettings(norm="2", steps=10)), 0.5),
        (DeepFoolAttack(DeepFoolSettings(norm="inf", steps=10)), 0.1),
    ],
)
def test_budget_and_bounds(small_mlp, digits_pixels, attack, eps):
    _, _, xt, yt = digits_pixels
    res = attack(small_mlp, xt[:50], yt[:50], eps, seed=0)
    norm = attack.settings.norm
    assert res.x_adv.shape == xt[:50].shape
    assert float(lp_norms(res.x_adv - xt[:50], norm).max()) <= eps * (1 + 1e-5)
    assert float(res.sizes.max()) <= eps * (1 + 1e-5)
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    scores = evaluate_adversarial(small_mlp, xt[:50], yt[:50], res.x_adv)
    assert scores["robust_accuracy"] <= scores["clean_accuracy"] + 1e-9


def test_stronger_attacks_and_budgets_lower_robust_accuracy(small_mlp, digits_pixels):
    _, _, xt, yt = digits_pixels
    x, y = xt[:80], yt[:80]
    pgd = PGDAttack(PGDSettings(norm="inf", steps=10))
    fgsm = FGSMAttack(FGSMSettings(norm="inf"))
    r_small = evaluate_adversarial(small_mlp, x, y, pgd(small_mlp, x, y, 0.03).x_adv)[
        "robust_accuracy"
    ]
    r_large = evaluate_adversarial(small_mlp, x, y, pgd(small_mlp, x, y, 0.1).x_adv)[
        "robust_accuracy"
    ]
    r_fgsm = evaluate_adversarial(small_mlp, x, y, fgsm(small_mlp, x, y, 0.1).x_adv)[
        "robust_accuracy"
    ]
    assert r_large < r_small
    assert r_large <= r_fgsm + 0.02  # PGD is at least as strong as one FGSM step


@pytest.mark.parametrize(
    "name,settings,eps,tol",
    [
        ("fgsm", {"norm": "inf"}, 0.08, 0.0),
        ("pgd", {"norm": "inf", "steps": 10}, 0.08, 0.05),
        ("pgd", {"norm": "2", "steps": 10}, 0.6, 0.05),
        ("deepfool", {"norm": "2", "steps": 20}, 0.6, 0.05),
    ],
)
def test_foolbox_and_torch_agree(small_mlp, digits_pixels, name, settings, eps, tol):
    _, _, xt, yt = digits_pixels
    x, y = xt[:100], yt[:100]
    cls, stype = {
        "fgsm": (FGSMAttack, FGSMSettings),
        "pgd": (PGDAttack, PGDSettings),
        "deepfool": (DeepFoolAttack, DeepFoolSettings),
    }[name]
    ours = cls(stype(backend="torch", **settings))(small_mlp, x, y, eps, seed=0)
    theirs = cls(stype(backend="foolbox", **settings))(small_mlp, x, y, eps, seed=0)
    r_ours = evaluate_adversarial(small_mlp, x, y, ours.x_adv)["robust_accuracy"]
    r_theirs = evaluate_adversarial(small_mlp, x, y, theirs.x_adv)["robust_accuracy"]
    clean = evaluate_adversarial(small_mlp, x, y, x)["clean_accuracy"]
    assert r_theirs < clean  # the budget is large enough to matter
    assert abs(r_ours - r_theirs) <= tol + 1e-9
    if name == "fgsm":
        assert torch.allclose(ours.x_adv, theirs.x_adv, atol=1e-6)


def test_deform_is_a_pixel_shift_with_align_corners():
    x = torch.rand(2, 1, 6, 7)
    assert torch.allclose(deform(x, torch.zeros(2, 2, 6, 7)), x, atol=1e-6)
    tau = torch.zeros(2, 2, 6, 7)
    tau[:, 0] = 1.0  # sample one pixel to the right
    shifted = deform(x, tau)
    assert torch.allclose(shifted[..., :-1], x[..., 1:], atol=1e-5)
    tau = torch.zeros(2, 2, 6, 7)
    tau[:, 1] = 1.0  # one pixel down
    assert torch.allclose(deform(x, tau)[..., :-1, :], x[..., 1:, :], atol=1e-5)
    tau[0, :, 2, 3] = torch.tensor([3.0, 4.0])
    assert float(t_norm(tau)[0]) == pytest.approx(5.0)


def test_adef_stays_within_t_norm_and_fools(small_mlp, digits_pixels):
    _, _, xt, yt = digits_pixels
    x, y = xt[:40], yt[:40]
    attack = ADefAttack(ADefSettings(steps=30, sigma=0.5))
    res = attack(small_mlp, x, y, 1.5, seed=0)
    assert float(res.sizes.max()) <= 1.5 + 1e-6
    assert float(res.x_adv.min()) >= 0.0 and float(res.x_adv.max()) <= 1.0
    scores = evaluate_adversarial(small_mlp, x, y, res.x_adv)
    assert scores["robust_accuracy"] < scores["clean_accuracy"] - 0.1
    tight = attack(small_mlp, x, y, 0.05, seed=0)
    assert (
        evaluate_adversarial(small_mlp, x, y, tight.x_adv)["robust_accuracy"]
        >= scores["robust_accuracy"]
    )


@pytest.mark.parametrize(
    "build",
    [
        lambda: PGDSettings(norm="inf", restarts=0),
        lambda: PGDSettings(norm="2", steps=0),
        lambda: FGSMSettings(norm="inf", backend="cleverhans"),
        lambda: DeepFoolSettings(norm="l1"),
        lambda: ADefSettings(sigma=-1.0),
    ],
)
def test_settings_reject_bad_values(build):
    with pytest.raises(UsageError):
        build()


def test_eps_must_be_positive(small_mlp, digits_pixels):
    _, _, xt, yt = digits_pixels
    with pytest.raises(UsageError, match="eps"):
        FGSMAttack(FGSMSettings())(small_mlp, xt[:4], yt[:4], 0.0)
