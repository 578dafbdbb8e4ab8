"""The active-subspace line search, evaluated lazily (exactly the decisions of the eager one).

Algorithm 4 tries v +- step d for shrinking steps and keeps the better candidate once it fools
more fit samples than v does. Most tries fail, and a try fails as soon as the samples still to
score cannot lift its count above v's: ``LazyCount`` scores x + v chunk by chunk and stops there.
The samples v does not fool yet are scored first (a failing try mostly fails on them), so a
failure is usually decided after a fraction of a pass. Only the candidate that is kept is scored
to the end; its predictions are the next iteration's. Counts do not depend on the order, so
every decision is the one the eager search makes.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from odekit.methods.attacks.space import apply_perturbation

# at least this many chunks per pass over the fit set, so a failing try can stop early
_CHUNKS = 8


def _most_hits_not_above(ratio: float, n: int) -> int:
    """The largest count h with h / n <= ratio (the float comparison the eager search makes)."""
    if n == 0 or math.isnan(ratio):  # nothing counts, or NaN: no count is ever "more"
        return n
    h = min(n, max(-1, math.floor(ratio * n)))
    while h + 1 <= n and (h + 1) / n <= ratio:
        h += 1
    while h >= 0 and h / n > ratio:
        h -= 1
    return h


class LazyCount:
    """Successes of the perturbation ``v`` on ``x`` (prediction changed, or on ``target``),
    scored chunk by chunk only as far as a question needs."""

    def __init__(self, model: nn.Module, x: Tensor, v: Tensor, clean: Tensor, batch_size: int, target: int | None) -> None:
        self.model, self.x, self.v, self.clean, self.target = model, x, v, clean, target
        self.chunk = max(1, min(batch_size, math.ceil(len(x) / _CHUNKS)))
        counted = clean != target if target is not None else torch.ones_like(clean, dtype=torch.bool)
        self.counted = counted
        self.n = int(counted.sum())
        self.done, self.hits, self.scored = 0, 0, 0
        self.preds: list[Tensor] = []

    @property
    def finished(self) -> bool:
        return self.done >= len(self.x)

    def _step(self) -> None:
        sl = slice(self.done, self.done + self.chunk)
        with torch.no_grad():
            pred = self.model(apply_perturbation(self.x[sl], self.v)).argmax(1)
        clean, counted = self.clean[sl].to(pred.device), self.counted[sl].to(pred.device)
        hit = (pred != clean) if self.target is None else (pred == self.target)
        self.hits += int((hit & counted).sum())
        self.scored += int(counted.sum())
        self.preds.append(pred)
        self.done += len(pred)

    def more_than(self, h: int) -> bool:
        """Whether the final count exceeds ``h``, scoring only until that is decided."""
        while not self.finished:
            if self.hits > h:
                return True
            if self.hits + (self.n - self.scored) <= h:
                return False
            self._step()
        return self.hits > h

    def rate(self) -> float:
        while not self.finished:
            self._step()
        return self.hits / self.n if self.n else float("nan")

    def predictions(self) -> Tensor:
        self.rate()
        return torch.cat(self.preds)


def _hardest_first(pred: Tensor, clean: Tensor, target: int | None) -> Tensor:
    """Sample order: those the current vector does not fool (or push to ``target``) first."""
    missed = (pred == clean) if target is None else (pred != target)
    return torch.cat([missed.nonzero().flatten(), (~missed).nonzero().flatten()])


def line_search(
    model: nn.Module,
    x: Tensor,
    clean: Tensor,
    v: Tensor,
    pred: Tensor,
    d: Tensor,
    ratio: float,
    steps: list[float],
    project: Callable[[Tensor], Tensor],
    batch_size: int,
    target: int | None,
) -> tuple[Tensor, float, bool, Tensor]:
    """Algorithm 4's backtracking over ``steps`` from v (whose predictions on x are ``pred``):
    the first candidate v +- step d (the better of the two, + on ties) that fools more than
    ``ratio``, else the better candidate of the last step. Returns (v, its rate, accepted, its
    predictions on x)."""
    threshold = _most_hits_not_above(ratio, int((clean != target).sum()) if target is not None else len(clean))
    order = _hardest_first(pred, clean.to(pred.device), target).to(x.device)
    xs, cs = x[order], clean[order.to(clean.device)]

    def found(best: LazyCount) -> Tensor:
        out = torch.empty_like(clean)
        out[order.to(clean.device)] = best.predictions().to(clean.device)
        return out

    for k, step in enumerate(steps):
        pos = LazyCount(model, xs, project(v + step * d), cs, batch_size, target)
        neg = LazyCount(model, xs, project(v - step * d), cs, batch_size, target)
        pos_more, neg_more = pos.more_than(threshold), neg.more_than(threshold)
        if pos_more and not neg_more:
            return pos.v, pos.rate(), True, found(pos)
        if neg_more and not pos_more:
            return neg.v, neg.rate(), True, found(neg)
        if pos_more or k == len(steps) - 1:  # both improve, or the last step: the better one
            best = pos if pos.rate() >= neg.rate() else neg
            return best.v, best.rate(), pos_more, found(best)
    raise AssertionError("line_search needs at least one step")
