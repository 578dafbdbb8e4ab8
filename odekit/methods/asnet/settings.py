"""ASNet settings (validated on creation) and ``--rank``: reduce's rank grammar plus ``auto``."""

from __future__ import annotations

from dataclasses import dataclass, field

from odekit.errors import UsageError
from odekit.linalg.rank import parse_rank_option

THESIS_RANK = 50  # default r of thesis ch. 6.5.1
DEFAULT_SKETCH = 100
RANK_KEYWORDS = ("auto",)  # asnet's own word beside reduce's grammar: eq. 6.17 at --energy-tol
LOGREG_MAX_SAMPLES = 5000  # the LR-on-all-features baseline holds samples x n_l floats


# ----------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class SubspaceSettings:
    """How the active subspace of one layer is estimated (Algorithm 3)."""

    eps: float = 0.05
    sketch_size: int = DEFAULT_SKETCH
    samples: int | None = None  # training samples streamed (None: all)
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.eps < 1.0:
            raise UsageError(f"`energy_tol` must lie in (0, 1), got {self.eps}", "the thesis uses 0.05")
        if self.sketch_size < 2:
            raise UsageError(f"`sketch_size` must be >= 2, got {self.sketch_size}", "try 100")
        if self.samples is not None and self.samples < 2:
            raise UsageError(f"`fit_samples` must be >= 2, got {self.samples}", "omit it to use the whole training split")
        if self.batch_size < 1:
            raise UsageError(f"`batch_size` must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class ASNetSettings:
    """Algorithm 2: cut, rank, PCE degree, fine-tuning and sparsity."""

    cut: str
    # None: min(50, what the PCE sample rule allows); "auto": eq. 6.17 at eps; or a rank rule
    # of reduce's grammar ("vbmf", "energy:0.9", "factor:4") applied to the gradient sketch
    rank: int | str | None = None
    degree: int = 2
    ridge: float = 0.0
    finetune_epochs: int = 0
    lr: float = 1e-4
    head_lr: float | None = None  # AS + PCE layers (thesis: 1e-5); None: lr
    beta: float = 0.1
    sparse: bool = False
    l1: float = 1.0
    baselines: bool = True
    latency: bool = True
    val_fraction: float = 0.1  # training samples held out to choose the fine-tuning epoch kept
    patience: int | None = None
    subspace: SubspaceSettings = field(default_factory=SubspaceSettings)

    def __post_init__(self) -> None:
        if isinstance(self.rank, str):
            parse_rank_option(self.rank, "`rank`", RANK_KEYWORDS)
        if isinstance(self.rank, int) and self.rank < 1:
            raise UsageError(f"`rank` must be >= 1, got {self.rank}", "e.g. `rank` 50")
        if not 1 <= self.degree <= 6:
            raise UsageError(f"`degree` must lie in 1..6, got {self.degree}", "the thesis uses p = 2")
        if not self.ridge >= 0:  # also NaN
            raise UsageError(f"`ridge` must be >= 0, got {self.ridge}", "e.g. `ridge` 1e-6")
        if self.finetune_epochs < 0:
            raise UsageError(f"`finetune` must be >= 0 epochs, got {self.finetune_epochs}")
        if not self.lr > 0:
            raise UsageError(f"`lr` must be positive, got {self.lr}", "try 1e-3")
        if self.head_lr is not None and not self.head_lr > 0:
            raise UsageError(f"`head_lr` must be positive, got {self.head_lr}", "the thesis uses 1e-5")
        if not 0.0 <= self.beta <= 1.0:
            raise UsageError(f"`beta` must lie in [0, 1], got {self.beta}", "the thesis uses 0.1")
        if self.l1 < 0:
            raise UsageError(f"`l1` must be >= 0, got {self.l1}")
        if self.sparse and self.finetune_epochs == 0:
            raise UsageError("`sparse` needs fine-tuning epochs for its proximal steps", "add `finetune` EPOCHS")
        if isinstance(self.rank, int) and self.rank > self.subspace.sketch_size:
            raise UsageError(
                f"`rank` {self.rank} exceeds `sketch_size` {self.subspace.sketch_size}",
                f"use `sketch_size` {2 * self.rank} or more",
            )


def parse_rank(text: str | None) -> int | str | None:
    """CLI text -> rank setting: None, 'auto', a positive int or a rank rule ('vbmf', 'energy:0.9',
    'factor:4'), read by the one rank parser of ``odekit.linalg.rank``."""
    if text is None:
        return None
    parsed = parse_rank_option(text, "`rank`", RANK_KEYWORDS)
    if isinstance(parsed, str):
        return parsed
    return int(parsed.value or 0) if parsed.name == "fixed" else str(parsed)


def default_sketch_size(rank: int | str | None) -> int:
    return max(DEFAULT_SKETCH, 2 * rank) if isinstance(rank, int) else DEFAULT_SKETCH
