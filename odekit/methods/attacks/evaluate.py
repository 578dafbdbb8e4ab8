"""Scoring attacks on a target model: accuracy, robust accuracy, fooling rate, transfer matrices."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor, nn

from odekit.methods.attacks.base import attack_success, predict_on, summed_over_ranks
from odekit.methods.attacks.space import apply_perturbation
from odekit.stats import Proportion, wilson_interval

if TYPE_CHECKING:
    from odekit.distributed import Distributed


def evaluate_adversarial(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    x_adv: Tensor,
    batch_size: int = 512,
    target: int | None = None,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """clean_accuracy, robust_accuracy (true labels) and fooling_rate (prediction changed; with
    ``target``, share of the samples not predicted as it that land on it), with the counts
    behind them (``n``, ``clean_correct``, ``robust_correct``, ``fooled`` of ``fooling_n``) for
    confidence intervals. With ``dist`` every rank passes the whole set, scores its shard and
    gets the counts summed over the ranks (the numbers of one process)."""
    if dist is not None and dist.world_size > 1:
        shard = dist.shard(len(x))
        x, y, x_adv = (t[shard.start : shard.stop] for t in (x, y, x_adv))
    clean = predict_on(model, x, batch_size)
    adv = predict_on(model, x_adv, batch_size)
    y = y.to(clean.device)
    fooled = summed_over_ranks(attack_success(adv, clean, target), dist)
    accuracy = summed_over_ranks(Proportion(int((clean == y).sum()), len(y)), dist)
    robust = summed_over_ranks(Proportion(int((adv == y).sum()), len(y)), dist)
    n, clean_correct, robust_correct = accuracy.n, accuracy.successes, robust.successes
    return {
        "clean_accuracy": clean_correct / n if n else float("nan"),
        "robust_accuracy": robust_correct / n if n else float("nan"),
        "fooling_rate": fooled.rate,
        "n": n,
        "clean_correct": clean_correct,
        "robust_correct": robust_correct,
        "fooled": fooled.successes,
        "fooling_n": fooled.n,
    }


def evaluate_universal(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    v: Tensor,
    batch_size: int = 512,
    target: int | None = None,
    dist: Distributed | None = None,
) -> dict[str, float]:
    """`evaluate_adversarial` for x + v clipped to the box (sharded over ``dist``'s ranks)."""
    x_adv = apply_perturbation(x, v.to(x.device))
    return evaluate_adversarial(model, x, y, x_adv, batch_size, target, dist)


@dataclass
class TransferMatrix:
    """fooling_rate[i][j]: attack generated on sources[i], evaluated on targets[j]; the
    ``*_ci95`` entries are Wilson 95% intervals [low, high] of the same cells."""

    sources: list[str]
    targets: list[str]
    fooling_rate: list[list[float]]
    robust_accuracy: list[list[float]]
    fooling_rate_ci95: list[list[list[float]]] = field(default_factory=list)
    robust_accuracy_ci95: list[list[list[float]]] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {
            "sources": self.sources,
            "targets": self.targets,
            "fooling_rate": self.fooling_rate,
            "robust_accuracy": self.robust_accuracy,
            "fooling_rate_ci95": self.fooling_rate_ci95,
            "robust_accuracy_ci95": self.robust_accuracy_ci95,
        }


def transfer_matrix(
    sources: list[tuple[str, nn.Module]],
    targets: list[tuple[str, nn.Module]],
    generate: Callable[[nn.Module], Tensor],
    x: Tensor,
    y: Tensor,
    batch_size: int = 512,
) -> TransferMatrix:
    """``generate(source)`` returns attacked inputs for ``x`` (a universal vector already applied,
    or per-sample adversarial examples); every target scores every source's inputs. With the
    same models as sources and targets the diagonal is the white-box result."""
    fool, robust, fool_ci, robust_ci = [], [], [], []
    for _, source in sources:
        x_adv = generate(source).to(x.device)
        rows = [evaluate_adversarial(target, x, y, x_adv, batch_size) for _, target in targets]
        fool.append([r["fooling_rate"] for r in rows])
        robust.append([r["robust_accuracy"] for r in rows])
        fool_ci.append([list(wilson_interval(int(r["fooled"]), int(r["fooling_n"]))) for r in rows])
        robust_ci.append([list(wilson_interval(int(r["robust_correct"]), int(r["n"]))) for r in rows])
    return TransferMatrix([n for n, _ in sources], [n for n, _ in targets], fool, robust,
                          fool_ci, robust_ci)  # fmt: skip
