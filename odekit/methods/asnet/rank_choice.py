"""The ASNet's rank r from ``--rank`` and the gradient sketch of the cut layer."""

from __future__ import annotations

from dataclasses import dataclass

from odekit.errors import NumericalError
from odekit.linalg.rank import RANK_RULES, RankContext, parse_rank_spec, rule_rank
from odekit.methods.asnet.head import max_rank_for_samples
from odekit.methods.asnet.settings import THESIS_RANK
from odekit.methods.asnet.subspace import ActiveSubspace


@dataclass(frozen=True)
class RankChoice:
    rank: int
    rule: str  # how it was chosen, for the report


def choose_rank(
    requested: int | str | None,
    subspace: ActiveSubspace,
    features: int,
    degree: int,
    n_train: int,
    sketch_size: int,
    eps: float,
) -> RankChoice:
    """None: min(50, the PCE sample rule); 'auto': eq. 6.17 at ``eps``; an int as given; a rank
    rule (vbmf, energy:F, factor:F) on the sketch's singular values with the exact ||G||_F^2.
    The rank must fit the sketch, the layer and the streamed samples."""
    limit = min(sketch_size, features, subspace.n_samples)
    if requested is None:
        rank = min(THESIS_RANK, max_rank_for_samples(n_train, degree), limit)
        rule = f"min(50, largest r with 2 C(r+{degree},{degree}) <= {n_train} samples)"
    elif requested == "auto":
        rank = min(subspace.active_neurons(eps), limit)
        rule = f"active neurons at eps = {eps} (eq. 6.17)"
    elif isinstance(requested, int):
        rank, rule = requested, "`rank`"
    else:
        spec = parse_rank_spec(requested)
        ctx = RankContext(subspace.singular_values, subspace.n_samples, features, subspace.total_energy)
        rank = rule_rank(spec, ctx)
        rule = f"`rank` {spec}" + (f" ({RANK_RULES.entry(spec.name).description})" if spec.name in RANK_RULES else "")
    if rank > limit:
        raise NumericalError(
            f"rank {rank} needs {rank} samples and sketch rows; {subspace.n_samples} samples were streamed "
            f"into a sketch of {sketch_size} rows for {features} neurons",
            "use more `fit_samples`, a larger `sketch_size` or a lower `rank`",
        )
    return RankChoice(rank, rule)
