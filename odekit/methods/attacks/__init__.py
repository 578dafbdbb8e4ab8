"""Universal perturbations (active subspace, UAP, random), per-sample attacks (FGSM, PGD,
DeepFool, ADef), transfer and grey-box evaluation. Everything works in [0, 1] pixel space on a
`PixelModel`; budgets are pixel-unit norms."""

from odekit.methods.attacks.adef import ADefAttack, ADefSettings, deform, t_norm
from odekit.methods.attacks.base import (
    ATTACKS,
    Attack,
    PerSampleAttack,
    PerSampleResult,
    PerSampleSettings,
    UniversalAttack,
    UniversalResult,
    UniversalSettings,
    fooling_rate,
    predict_on,
)
from odekit.methods.attacks.deepfool import deepfool
from odekit.methods.attacks.evaluate import (
    TransferMatrix,
    evaluate_adversarial,
    evaluate_universal,
    transfer_matrix,
)
from odekit.methods.attacks.per_sample import (
    BACKENDS,
    DeepFoolAttack,
    DeepFoolSettings,
    FGSMAttack,
    FGSMSettings,
    PGDAttack,
    PGDSettings,
)
from odekit.methods.attacks.solvers import SolverSpec, ode_blocks, parse_solver_spec, with_solver
from odekit.methods.attacks.space import (
    NORMS,
    PixelModel,
    apply_perturbation,
    check_differentiable,
    lp_norm,
    lp_norms,
    parse_norm,
    pixel_model,
    project,
    to_model_units,
    to_pixels,
)
from odekit.methods.attacks.universal import (
    ActiveSubspaceAttack,
    ActiveSubspaceSettings,
    RandomAttack,
    UAPAttack,
    UAPSettings,
)

# registration order is the order of --method choices and help texts
ATTACKS.add(
    "active-subspace",
    ActiveSubspaceAttack,
    "universal: recursive active-subspace direction (thesis Algorithm 4)",
)
ATTACKS.add(
    "uap", UAPAttack, "universal: UAP (Moosavi-Dezfooli et al. 2017), DeepFool steps accumulated"
)
ATTACKS.add(
    "random", RandomAttack, "universal baseline: Gaussian direction scaled to the budget norm"
)
ATTACKS.add("fgsm", FGSMAttack, "per-sample: fast gradient (sign) method, one step")
ATTACKS.add("pgd", PGDAttack, "per-sample: projected gradient descent, random start, restarts")
ATTACKS.add(
    "deepfool", DeepFoolAttack, "per-sample: DeepFool minimal perturbation, restricted to eps"
)
ATTACKS.add(
    "adef",
    ADefAttack,
    "per-sample: ADef adversarial deformation (smooth vector field), T-norm budget",
)

__all__ = [
    "ATTACKS",
    "BACKENDS",
    "NORMS",
    "ADefAttack",
    "ADefSettings",
    "ActiveSubspaceAttack",
    "ActiveSubspaceSettings",
    "Attack",
    "DeepFoolAttack",
    "DeepFoolSettings",
    "FGSMAttack",
    "FGSMSettings",
    "PGDAttack",
    "PGDSettings",
    "PerSampleAttack",
    "PerSampleResult",
    "PerSampleSettings",
    "PixelModel",
    "RandomAttack",
    "SolverSpec",
    "TransferMatrix",
    "UAPAttack",
    "UAPSettings",
    "UniversalAttack",
    "UniversalResult",
    "UniversalSettings",
    "apply_perturbation",
    "check_differentiable",
    "deepfool",
    "deform",
    "evaluate_adversarial",
    "evaluate_universal",
    "fooling_rate",
    "lp_norm",
    "lp_norms",
    "ode_blocks",
    "parse_norm",
    "parse_solver_spec",
    "pixel_model",
    "predict_on",
    "project",
    "t_norm",
    "to_model_units",
    "to_pixels",
    "transfer_matrix",
    "with_solver",
]
