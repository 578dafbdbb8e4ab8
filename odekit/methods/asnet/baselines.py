"""Baselines of thesis fig. 6.5b at the same r: PCA+PCE, AS+LR, PCA+LR and LR on all features."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from odekit.errors import NumericalError
from odekit.io.datasets import Dataset, Split
from odekit.linalg import FrequentDirections
from odekit.methods.asnet.head import (
    Projection,
    fit_head,
    project,
)
from odekit.methods.asnet.settings import (
    LOGREG_MAX_SAMPLES,
    ASNetSettings,
)
from odekit.methods.pce import PCEFit


@dataclass(frozen=True)
class Baselines:
    """Test accuracies at the ASNet's r without fine-tuning (thesis fig. 6.5b). Only ``as_pce`` (the
    ASNet itself) when the baselines were skipped."""

    as_pce: float
    pca_pce: float | None = None
    as_logreg: float | None = None
    pca_logreg: float | None = None
    logreg_features: float | None = None
    rank: int | None = None
    pca_pce_fit: PCEFit | None = None

    NAMES = ("as_pce", "pca_pce", "as_logreg", "pca_logreg", "logreg_features")

    def accuracies(self) -> dict[str, float]:
        """Method name -> test accuracy, for the methods that ran (in ``NAMES`` order)."""
        return {name: value for name in self.NAMES if (value := getattr(self, name)) is not None}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.accuracies())
        if self.rank is not None:
            out["rank"] = self.rank
        if self.pca_pce_fit is not None:
            out["pca_pce_fit"] = self.pca_pce_fit.to_dict()
        return out


def _logreg_accuracy(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int
) -> float:
    """Multinomial logistic regression on standardised features (thesis fig. 6.5b 'LR')."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(y_train)) < 2:
        raise NumericalError("logistic regression needs at least two classes in the training samples", "use more `fit_samples`")
    scaler = StandardScaler().fit(x_train)
    clf = LogisticRegression(max_iter=500, C=1.0, random_state=seed)
    with warnings.catch_warnings():
        # a not-quite-converged baseline is still a fair baseline; the report says max_iter
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_test)) == y_test).mean())


def _baselines(
    pre: nn.Module,
    fit_split: Split,
    data: Dataset,
    train: Projection,
    pca_fd: FrequentDirections,
    V: Tensor,
    mean: Tensor,
    rank: int,
    settings: ASNetSettings,
    device: torch.device,
    as_pce: float,
) -> Baselines:
    """Thesis fig. 6.5b at the same r, no fine-tuning: PCA+PCE, AS+LR, PCA+LR, LR(all features).
    PCA = top-r right singular vectors of the centred pre-model outputs (same sketch)."""
    bs, seed = settings.subspace.batch_size, settings.subspace.seed
    _, W_pca = pca_fd.right_singular(rank)
    W_pca = W_pca.double()
    z_pca = project(pre, fit_split, {"pca": (W_pca, mean)}, bs, device).z["pca"]
    pca_head = fit_head(z_pca, train.logits if train.logits is not None else torch.empty(0), settings.degree, settings.ridge)
    test = project(pre, data.test, {"as": (V, None), "pca": (W_pca, mean)}, bs, device, keep_features=LOGREG_MAX_SAMPLES)
    assert train.features is not None and test.features is not None
    y_tr, y_te = train.labels.numpy(), test.labels.numpy()

    def lr(z_tr: Tensor, z_te: Tensor) -> float:
        return _logreg_accuracy(z_tr.float().numpy(), y_tr, z_te.float().numpy(), y_te, seed)

    return Baselines(
        as_pce=as_pce,
        pca_pce=pca_head.accuracy(test.z["pca"], test.labels),
        as_logreg=lr(train.z["as"], test.z["as"]),
        pca_logreg=lr(z_pca, test.z["pca"]),
        logreg_features=_logreg_accuracy(
            train.features, y_tr[: len(train.features)], test.features, y_te[: len(test.features)], seed
        ),
        rank=rank,
        pca_pce_fit=pca_head.fit,
    )
