"""λ search strategies: which merges to evaluate next, given everything evaluated so far.

Each evaluation is a SecAgg+ round over all hospitals, and each candidate costs every site a
full pass over its fold, so the search is written as "propose a batch, receive pooled metrics"
and the driver (`run_search`) is shared by the federated coordinator and the central benchmark.
- grid: evenly spaced points, PatientDx's protocol; one round.
- adaptive: a coarse grid of cell centres, then refinement around the current best (best ±
  half the previous step) until the step falls below `tolerance` or the round budget is spent.
  A parabola through the best and its neighbours was tried first and misled by the flat
  parent-side shoulder of real curves (bench/search_efficiency.py: gap 0.010 on the demo);
  bisection makes no shape assumption beyond the peak lying near the best point seen.
Both return the full curve of everything evaluated.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.metrics import PooledMetrics
from common.protocol import Candidate, candidate_key
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


def best_within_noise(evals: Sequence[Evaluation]) -> Evaluation:
    """λ* that does not chase privacy noise. Without noise: `best_of`. With noise (one λ per
    candidate): the argmax of the Gaussian-process posterior mean of the AUROC curve over λ
    (`server.noisy_curve`), ties to the higher raw AUROC.

    Why: the noise is nearly independent across candidates (a round's shared class totals add
    a small common part, `common.metrics.noisy`) while a merge's AUROC curve is smooth in
    λ, so reading each λ together with its neighbours cuts the noise; the process weighs them
    by the known noise, unlike a fixed moving mean, which is too rough on a small cohort and
    biased at a sharp peak on a large one (numbers in noisy_curve's docstring). Candidates
    with one λ per group keep `best_of`.
    """
    from server.noisy_curve import smoothed_aurocs

    smooth = smoothed_aurocs(evals)
    if smooth is None:
        return best_of(evals)
    ranked = [i for i, v in enumerate(smooth) if v is not None]
    top = max(ranked, key=lambda i: (smooth[i], evals[i].metrics.auroc, -i))
    return evals[top]


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


def cell_centres(n: int) -> list[float]:
    """n points at the centres of n equal cells of [0, 1]: every λ lies within 1/(2n) of one,
    and halving steps from them reach both parents (λ = 0 and 1) when the best is at an edge."""
    return [round((2 * i + 1) / (2 * n), 10) for i in range(n)]


class AdaptiveSearch:
    """A coarse grid of cell centres, then refinement around the best until `tolerance`.

    For one λ each refinement round evaluates best ± step/2 and halves the step: a batched
    bisection that needs no smoothness beyond "the peak is near the best point seen". With one
    λ per group it is a pattern search: ±step on each axis around the best, halving the step
    whenever the best stays put.
    """

    def __init__(self, settings: SearchSettings, groups: Sequence[str] | None = None):
        self.settings = settings
        self.groups = tuple(groups) if groups else None
        self.rounds = 0
        self.step = 1.0 / settings.coarse_points
        self._last_best: tuple | None = None

    def propose(self, history: Sequence[Evaluation]) -> list[Candidate]:
        if not history:
            centres = cell_centres(self.settings.coarse_points)
            if self.groups is None:
                return list(centres)
            return [
                dict(zip(self.groups, combo, strict=True))
                for combo in itertools.product(centres, repeat=len(self.groups))
            ]
        if self.rounds >= self.settings.max_rounds:
            return []
        self.rounds += 1
        seen = {candidate_key(e.candidate) for e in history}
        if self.groups is None:
            return self._refine_1d(history, seen)
        return self._pattern(history, seen)

    def _refine_1d(self, history: Sequence[Evaluation], seen: set) -> list[Candidate]:
        best = float(best_of(history).candidate)
        while self.step / 2 >= self.settings.tolerance - 1e-9:
            self.step /= 2
            out: list[Candidate] = []
            for x in (best - self.step, best + self.step):
                x = round(min(max(x, 0.0), 1.0), 10)
                if candidate_key(x) not in seen and x not in out:
                    out.append(x)
            if out:
                return out
        return []

    def _pattern(self, history: Sequence[Evaluation], seen: set) -> list[Candidate]:
        # Pattern search: keep the step while the best moves, halve it when it stays put.
        best = best_of(history).candidate
        key = candidate_key(best)
        if key == self._last_best or self._last_best is None:
            self.step /= 2
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
