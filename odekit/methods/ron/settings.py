"""RON settings (validated on creation) and what ``build_student`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from odekit.errors import UsageError
from odekit.linalg.rank import RankSpec, parse_rank_option, parse_rank_spec
from odekit.linalg.sketch import SketchMerge
from odekit.models.ron_student import RONStudent
from odekit.streaming.throughput import StageThroughput

MODES = ("auto", "channel", "region")
RECONSTRUCTIONS = ("lsq", "interp")


def parse_target_flops(text: str | float | None) -> float | None:
    """--target-flops: a fraction of the teacher's FLOPs to keep (0.5) or a reduction factor (2x)."""
    if text is None:
        return None
    raw = str(text).strip().lower()
    try:
        value = 1.0 / float(raw[:-1]) if raw.endswith("x") else float(raw)
    except (ValueError, ZeroDivisionError):
        raise UsageError(
            f"cannot read `target_flops` '{text}'", "give the fraction of FLOPs to keep (0.5) or a factor (2x)"
        ) from None
    return value


@dataclass(frozen=True)
class RonSettings:
    """Settings of the student construction (validated on creation).

    ``mode``: "region" (the thesis' dense reduced-order network over ``layers``), "channel" (the
    same graph with fewer channels), "auto" (channel, or per range the cheaper of the two).
    ``target_flops``: fraction of the teacher's FLOPs to keep (channel widths allocated
    globally); ``max_drop``: validation accuracy points the student may lose; ``reconstruct``:
    "lsq" (ridge least squares to the teacher) or "interp" (POD interpolation V (S V)^+)."""

    layers: str | None = None
    rank: str = "vbmf"
    oversample: float = 1.5
    samples: int | None = None
    sketch_size: int | None = None
    batch_size: int = 256
    sketch_dtype: str = "float64"
    mode: str = "auto"
    target_flops: float | None = None
    max_drop: float | None = None
    reconstruct: str = "lsq"

    def __post_init__(self) -> None:
        if self.layers is not None and not str(self.layers).strip():
            raise UsageError("give the layers to reduce", "e.g. `layers` 7-16, or leave `layers` out")
        if self.mode not in MODES:
            raise UsageError(f"unknown `mode` '{self.mode}'", f"choose one of {', '.join(MODES)}")
        if self.mode == "region" and self.layers is None:
            raise UsageError("`mode` region needs `layers`", "e.g. `layers` 7-16, or use `mode` channel")
        if self.reconstruct not in RECONSTRUCTIONS:
            raise UsageError(
                f"unknown `reconstruct` '{self.reconstruct}'", f"choose one of {', '.join(RECONSTRUCTIONS)}"
            )
        if self.target_flops is not None and not 0.0 < self.target_flops <= 1.0:
            raise UsageError(
                f"`target_flops` must keep a fraction in (0, 1] of the teacher's FLOPs, got {self.target_flops:g}",
                "e.g. `target_flops` 0.5 or `target_flops` 2x",
            )
        if self.max_drop is not None and self.max_drop < 0:
            raise UsageError(f"`max_drop` must be >= 0 accuracy points, got {self.max_drop:g}")
        if self.mode == "region" and (self.target_flops is not None or self.max_drop is not None):
            raise UsageError(
                "`target_flops` and `max_drop` allocate channel widths", "use `mode` channel (or auto)"
            )
        specs = str(self.rank).split(",")
        if any(not part.strip() for part in specs):
            raise UsageError(
                f"cannot read `rank` '{self.rank}'",
                "use e.g. vbmf, energy:0.99, factor:4, 32 or 60,40,10",
            )
        for part in specs:
            parse_rank_option(part, "`rank`")

        if not self.oversample >= 1.0:
            raise UsageError(
                f"`oversample` must be >= 1 (P_k >= R_k rows), got {self.oversample}",
                "the thesis uses 1 to 2",
            )
        if self.samples is not None and self.samples < 1:
            raise UsageError(f"`fit_samples` must be positive, got {self.samples}")
        if self.sketch_size is not None and self.sketch_size < 2:
            raise UsageError(f"`sketch_size` must be >= 2, got {self.sketch_size}")
        if self.batch_size < 1:
            raise UsageError(f"`batch_size` must be positive, got {self.batch_size}")
        if self.sketch_dtype not in ("float32", "float64"):
            raise UsageError("sketch dtype must be float32 or float64")

    @property
    def rank_specs(self) -> list[RankSpec]:
        """One spec for every reduced layer, or one spec per reduced layer (comma list)."""
        return [parse_rank_spec(part) for part in str(self.rank).split(",")]


@dataclass
class RonLayerReport:
    """One reduced state (a modified layer's activation)."""

    state: str
    layers: list[str]
    dim: int
    rank: int
    rows: int
    pooled: bool
    sources: list[str]
    singular_values: list[float]  # sketch singular values divided by the largest
    decay: float  # sigma_R / sigma_1
    error_factor: float  # eq. 5.20: sqrt(1 + (D - P) R / (P + 1 - R))
    amplification: float  # measured ||V (S V)^+||_2 = 1 / sigma_min(S V)
    covariance_error: float  # FD bound on ||Z^T Z - B^T B||_2, relative to ||Z||_2^2 (approx.)
    residual_energy: float  # 1 - ||Z V||_F^2 / ||Z||_F^2 estimated from the sketch

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class RonResult:
    student: RONStudent
    args: dict[str, Any]
    layers: list[RonLayerReport]
    n_samples: int
    first_layer: int
    last_layer: int
    # issue 15: the activation-streaming stage's rate on this rank, and each state's merge
    throughput: StageThroughput | None = None
    merges: list[SketchMerge] = field(default_factory=list)

    @property
    def ranks(self) -> list[int]:
        return [layer.rank for layer in self.layers]
