"""λ search strategies against known curves (no Flower, no models)."""

from __future__ import annotations

import pytest

from common.metrics import PooledMetrics
from server.recipe import SearchSettings
from server.search import (
    AdaptiveSearch,
    GridSearch,
    best_of,
    grid_points,
    make_search,
    run_search,
    sorted_curve,
)


def _metrics(auroc: float) -> PooledMetrics:
    return PooledMetrics(
        n=100, positives=20, auroc=auroc, auprc=auroc / 2, auroc_error_bound=0.0, auroc_ci=None
    )


def _evaluator(f, log):
    def evaluate(cands, rnd):
        log.append(list(cands))
        return [_metrics(f(c)) for c in cands]

    return evaluate


def test_grid_is_paper_parity_in_one_round():
    log = []
    hist = run_search(
        GridSearch(SearchSettings(grid_points=11)), _evaluator(lambda x: x, log), max_per_round=11
    )
    assert [e.candidate for e in hist] == grid_points(11)
    assert grid_points(11)[1] == 0.1 and len(log) == 1
    assert best_of(hist).candidate == 1.0


def test_grid_chunks_by_the_per_round_maximum():
    log = []
    run_search(GridSearch(SearchSettings(grid_points=11)), _evaluator(lambda x: 0.5, log), 4)
    assert [len(c) for c in log] == [4, 4, 3]


@pytest.mark.parametrize("peak", [0.0, 0.13, 0.37, 0.62, 0.9, 1.0])
def test_adaptive_finds_a_smooth_peak_with_few_evaluations(peak):
    def f(x):
        return 0.8 - 0.3 * (x - peak) ** 2

    settings = SearchSettings(strategy="adaptive", coarse_points=3, tolerance=0.05, max_rounds=2)
    log = []
    hist = run_search(make_search(settings), _evaluator(f, log), 11)
    fine = max(f(x) for x in grid_points(21))
    assert len(hist) <= 5
    assert fine - f(best_of(hist).candidate) <= 0.005
    # The full curve is returned, in λ order on request.
    xs = [e.candidate for e in sorted_curve(hist)]
    assert xs == sorted(xs) and {0.0, 0.5, 1.0} <= set(xs)


def test_adaptive_stops_at_tolerance():
    settings = SearchSettings(strategy="adaptive", coarse_points=11, tolerance=0.1, max_rounds=5)
    hist = run_search(make_search(settings), _evaluator(lambda x: -abs(x - 0.3), []), 11)
    assert len(hist) == 11  # spacing 0.1 already meets the tolerance


def test_adaptive_groups_pattern_search():
    target = {"attention": 0.25, "mlp": 0.75}

    def f(c):
        return 0.9 - sum((c[g] - target[g]) ** 2 for g in target)

    settings = SearchSettings(strategy="adaptive", coarse_points=3, tolerance=0.2, max_rounds=3)
    search = AdaptiveSearch(settings, ("attention", "mlp"))
    hist = run_search(search, _evaluator(f, []), 32)
    best = best_of(hist).candidate
    assert best == target
    assert len({tuple(sorted(e.candidate.items())) for e in hist}) == len(hist)  # no repeats


def test_best_of_breaks_ties_by_auprc_then_order():
    from server.search import Evaluation

    a = Evaluation(
        0.2,
        PooledMetrics(n=1, positives=1, auroc=0.7, auprc=0.3, auroc_error_bound=0, auroc_ci=None),
    )
    b = Evaluation(
        0.4,
        PooledMetrics(n=1, positives=1, auroc=0.7, auprc=0.5, auroc_error_bound=0, auroc_ci=None),
    )
    c = Evaluation(
        0.6,
        PooledMetrics(n=1, positives=1, auroc=0.7, auprc=0.5, auroc_error_bound=0, auroc_ci=None),
    )
    assert best_of([a, b, c]).candidate == 0.4
