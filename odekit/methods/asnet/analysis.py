"""Per-layer active-subspace analysis (thesis fig. 6.3-6.4): which cut leaves how many active directions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from odekit.distributed import Distributed
from odekit.io.datasets import Dataset, Split
from odekit.methods.asnet.baselines import _logreg_accuracy
from odekit.methods.asnet.settings import (
    LOGREG_MAX_SAMPLES,
    SubspaceSettings,
)
from odekit.methods.asnet.subspace import (
    ActiveSubspace,
    active_subspace,
    stream_features,
)
from odekit.models.cut import (
    Cut,
    CutModel,
)
from odekit.models.layers import resolve_layers
from odekit.progress import Progress, silent_if_none

# ----------------------------------------------------------------------------- layer analysis


@dataclass
class LayerAnalysis:
    cut: Cut
    subspace: ActiveSubspace
    eps: float
    logreg_accuracy: float | None
    logreg_samples: int

    def to_dict(self, max_values: int = 200) -> dict[str, Any]:
        s = self.subspace
        return {
            **self.cut.to_dict(),
            "active_neurons": s.active_neurons(self.eps),
            "active_neurons_eq612": s.active_neurons_eq612(self.eps),
            "eps": self.eps,
            "samples": s.n_samples,
            "sketch_size": int(s.singular_values.shape[0]),
            "sketch_covariance_error_rel": s.covariance_error_rel,
            "singular_values": [float(v) for v in s.singular_values[:max_values]],
            "logreg_accuracy": self.logreg_accuracy,
            "logreg_train_samples": self.logreg_samples,
            "seconds": round(s.seconds, 3),
        }


def _collect(split: Split, pre: nn.Module, batch_size: int, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for f, y in stream_features(pre, split.subset(LOGREG_MAX_SAMPLES), batch_size, device):
        xs.append(f.flatten(1).float().cpu().numpy())
        ys.append(y.cpu().numpy())
    return np.concatenate(xs), np.concatenate(ys)


def analyze_layers(
    chain: CutModel,
    layers: str | None,
    data: Dataset,
    settings: SubspaceSettings,
    device: torch.device,
    logreg: bool = True,
    progress: Progress | None = None,
    dist: Distributed | None = None,
) -> list[LayerAnalysis]:
    """Active-neuron count, spectrum and LR-on-features accuracy for each chosen layer.
    ``dist`` (several ranks): sharded gradient sketches; the logistic regression (scikit-learn,
    all features in one process) is skipped."""
    progress = silent_if_none(progress)
    logreg = logreg and (dist is None or dist.world_size == 1)
    indices = chain.analysable_layers()
    if layers:
        indices = [layer.index for layer in resolve_layers(layers, chain.summary)]
    out = []
    for index in progress.track(indices, len(indices), "layers"):
        cut = chain.cut(index)
        train_feats: list[np.ndarray] = []
        train_labels: list[np.ndarray] = []

        def keep(a: Tensor, y: Tensor, feats: list[np.ndarray] = train_feats, labs: list[np.ndarray] = train_labels) -> None:
            if sum(len(f) for f in feats) < LOGREG_MAX_SAMPLES:
                feats.append(a.float().cpu().numpy())
                labs.append(y.cpu().numpy())

        sub = active_subspace(chain, cut, data.train, settings, device, keep=1, progress=progress,
                              on_batch=keep if logreg else None, dist=dist)  # fmt: skip
        acc, n_lr = None, 0
        if logreg:
            xt, yt = _collect(data.test, chain.pre_model(cut), settings.batch_size, device)
            x_tr = np.concatenate(train_feats)
            n_lr = len(x_tr)
            acc = _logreg_accuracy(x_tr, np.concatenate(train_labels), xt, yt, settings.seed)
        out.append(LayerAnalysis(cut, sub, settings.eps, acc, n_lr))
        progress.update(layer=index, active=sub.active_neurons(settings.eps))
    return out
