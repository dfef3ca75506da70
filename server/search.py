"""λ search strategies: which merges to evaluate next, given everything evaluated so far.

Each evaluation is a SecAgg+ round over all hospitals, and each candidate costs every site a
full pass over its fold, so the search is written as "propose a batch, receive pooled metrics"
and the driver (`run_search`) is shared by the federated coordinator and the central benchmark.
- grid: evenly spaced points, PatientDx's protocol; one round.
- adaptive: a coarse grid, then refinement around the current best until the spacing around
  it is below `tolerance` or the round budget is spent. For one λ each refinement evaluates
  the vertex of the parabola through the best point and its neighbours (AUROC curves over λ are
  smooth and usually single-peaked, so this converges in a few evaluations), falling back to
  bisecting the wider side. With one λ per group it is a pattern search: ±step on each axis
  around the best, halving the step each round.
Both return the full curve of everything evaluated.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from client.protocol import Candidate, candidate_key
from common.metrics import PooledMetrics
from server.recipe import SearchSettings


@dataclass(frozen=True)
class Evaluation:
    """One candidate's pooled metrics on the tuning fold, and the round that produced it."""

    candidate: Candidate
    metrics: PooledMetrics
    round: int = 0


def score_of(e: Evaluation) -> tuple[float, float]:
    """Ranking key: AUROC, then AUPRC (None counts as worst)."""
    m = e.metrics
    return (
        m.auroc if m.auroc is not None else float("-inf"),
        m.auprc if m.auprc is not None else float("-inf"),
    )


def best_of(evals: Sequence[Evaluation]) -> Evaluation:
    """Highest AUROC, ties broken by AUPRC, then by evaluation order (deterministic)."""
    if not evals:
        raise ValueError("no evaluations")
    return max(evals, key=lambda e: (score_of(e), -evals.index(e)))


def grid_points(n: int) -> list[float]:
    """n evenly spaced points on [0, 1], rounded so 0.1 prints as 0.1."""
    return [round(i / (n - 1), 10) for i in range(n)]


class GridSearch:
    def __init__(self, settings: SearchSettings, groups: Sequence[str] | None = None):
        self.points = grid_points(settings.grid_points)
        self.groups = tuple(groups) if groups else None
        self._done = False

    def propose(self, history: Sequence[Evaluation]) -> list[Candidate]:
        if self._done:
            return []
        self._done = True
        if self.groups is None:
            return list(self.points)
        return [
            dict(zip(self.groups, combo, strict=True))
            for combo in itertools.product(self.points, repeat=len(self.groups))
        ]


class AdaptiveSearch:
    def __init__(self, settings: SearchSettings, groups: Sequence[str] | None = None):
        self.settings = settings
        self.groups = tuple(groups) if groups else None
        self.rounds = 0
        self.step = 1.0 / (settings.coarse_points - 1)
        self._last_best: tuple | None = None

    def propose(self, history: Sequence[Evaluation]) -> list[Candidate]:
        if not history:
            return GridSearch(
                self.settings.model_copy(update={"grid_points": self.settings.coarse_points}),
                self.groups,
            ).propose(())
        if self.rounds >= self.settings.max_rounds:
            return []
        self.rounds += 1
        seen = {candidate_key(e.candidate) for e in history}
        if self.groups is None:
            proposal = self._refine_1d(history, seen)
        else:
            proposal = self._pattern(history, seen)
        return proposal

    def _refine_1d(self, history: Sequence[Evaluation], seen: set) -> list[Candidate]:
        tol = self.settings.tolerance
        pts = sorted({float(e.candidate): score_of(e)[0] for e in history}.items())
        xs = [p for p, _ in pts]
        b = xs.index(float(best_of(history).candidate))
        left = xs[b - 1] if b > 0 else None
        right = xs[b + 1] if b + 1 < len(xs) else None
        gaps = [
            g
            for g in (
                (xs[b] - left) if left is not None else 0.0,
                (right - xs[b]) if right is not None else 0.0,
            )
        ]
        if max(gaps) <= tol + 1e-9:
            return []
        x = None
        if left is not None and right is not None:
            x = _parabola_vertex(pts[b - 1], pts[b], pts[b + 1])
        if x is None or min(abs(x - p) for p in xs) < tol / 2:
            # Bisect the wider side next to the best.
            x = xs[b] - gaps[0] / 2 if gaps[0] >= gaps[1] else xs[b] + gaps[1] / 2
        x = round(min(max(x, 0.0), 1.0), 10)
        return [] if candidate_key(x) in seen else [x]

    def _pattern(self, history: Sequence[Evaluation], seen: set) -> list[Candidate]:
        # Classic pattern search: keep the step while the best moves, halve it when it stays.
        best = best_of(history).candidate
        key = candidate_key(best)
        if key == self._last_best:
            self.step /= 2
        else:
            self.step = (
                max(self.step / 2, self.settings.tolerance)
                if self._last_best is None
                else self.step
            )
        self._last_best = key
        if self.step < self.settings.tolerance - 1e-9:
            return []
        out: list[Candidate] = []
        for g in self.groups or ():
            for d in (-self.step, self.step):
                v = round(min(max(best[g] + d, 0.0), 1.0), 10)
                cand = {**best, g: v}
                ck = candidate_key(cand)
                if ck not in seen:
                    seen.add(ck)
                    out.append(cand)
        return out


def _parabola_vertex(a, b, c) -> float | None:
    """x of the extremum of the parabola through three (x, y) points, if it is a maximum
    inside [a.x, c.x]."""
    (x1, y1), (x2, y2), (x3, y3) = a, b, c
    if any(
        not isinstance(v, float) or v != v or v in (float("inf"), float("-inf"))
        for v in (y1, y2, y3)
    ):
        return None
    denom = (x1 - x2) * (x1 - x3) * (x2 - x3)
    if denom == 0:
        return None
    A = (x3 * (y2 - y1) + x2 * (y1 - y3) + x1 * (y3 - y2)) / denom
    B = (x3**2 * (y1 - y2) + x2**2 * (y3 - y1) + x1**2 * (y2 - y3)) / denom
    if A >= 0:
        return None  # flat or convex: no interior maximum
    x = -B / (2 * A)
    return x if x1 < x < x3 else None


def make_search(settings: SearchSettings, groups: Sequence[str] | None = None):
    return (GridSearch if settings.strategy == "grid" else AdaptiveSearch)(settings, groups)


def run_search(
    search,
    evaluate: Callable[[list[Candidate], int], list[PooledMetrics]],
    max_per_round: int,
) -> list[Evaluation]:
    """Drive a search: each proposal is evaluated (in chunks of at most `max_per_round`
    candidates, one round each) until the strategy proposes nothing. Returns the full curve."""
    history: list[Evaluation] = []
    rnd = 0
    while True:
        proposal = search.propose(history)
        if not proposal:
            return history
        for start in range(0, len(proposal), max_per_round):
            chunk = proposal[start : start + max_per_round]
            rnd += 1
            metrics = evaluate(chunk, rnd)
            history.extend(Evaluation(c, m, rnd) for c, m in zip(chunk, metrics, strict=True))


def sorted_curve(history: Sequence[Evaluation]) -> list[Evaluation]:
    """The curve in λ order (group candidates in lexicographic group order)."""
    return sorted(history, key=lambda e: candidate_key(e.candidate))
