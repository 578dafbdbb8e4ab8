"""Training of neural ODEs: ODENet classifiers and CNF density models (thesis ch. 4).

`regimes` (how u changes during training), `loop` (settings, result, the shared optimizer loop),
`evaluate` (test metrics), `train` (the two training loops and checkpoint metadata) and `jobs`
(train-ode's classify/density jobs: data, model, training, typed result).
"""

from odekit.methods.ode_train.evaluate import density_grid, evaluate_classifier, evaluate_cnf
from odekit.methods.ode_train.loop import (
    OPTIMIZERS,
    SCHEDULES,
    ODETrainResult,
    ODETrainSettings,
    StopRule,
    augment_images,
)
from odekit.methods.ode_train.regimes import (
    DEFAULT_U_SET,
    REGIMES,
    RegimeSettings,
    USampler,
    check_u,
)
from odekit.methods.ode_train.train import ode_checkpoint_meta, train_cnf, train_ode_classifier

__all__ = [
    "DEFAULT_U_SET",
    "OPTIMIZERS",
    "REGIMES",
    "SCHEDULES",
    "ODETrainResult",
    "ODETrainSettings",
    "RegimeSettings",
    "StopRule",
    "USampler",
    "augment_images",
    "check_u",
    "density_grid",
    "evaluate_classifier",
    "evaluate_cnf",
    "ode_checkpoint_meta",
    "train_cnf",
    "train_ode_classifier",
]
