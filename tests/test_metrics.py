"""Histogram metrics against scikit-learn on the raw scores, and additivity across sites."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from common.errors import FedmergeError
from common.metrics import HistogramSpec, pooled_metrics, score_histograms


def _delong_reference(scores, labels):
    """DeLong's AUROC variance straight from the pairwise definition (O(P·N))."""
    x = scores[labels == 1][:, None]
    y = scores[labels == 0][None, :]
    psi = (x > y) + 0.5 * (x == y)
    auc = psi.mean()
    v10, v01 = psi.mean(axis=1), psi.mean(axis=0)
    var = v10.var(ddof=1) / v10.size + v01.var(ddof=1) / v01.size
    half = 1.959963984540054 * np.sqrt(var)
    return auc, (max(0.0, auc - half), min(1.0, auc + half))


def _cases():
    rng = np.random.default_rng(7)
    n = 3000
    y = (rng.random(n) < 0.2).astype(int)
    random = rng.normal(0, 2, n) + 1.2 * y
    tied = np.round(rng.normal(0, 1.5, n) + y)  # a handful of distinct values
    extreme = rng.choice([-50.0, 50.0], n) * (rng.random(n) < 0.5) + rng.normal(0, 3, n) + 2 * y
    return {"random": (random, y), "tied": (tied, y), "extreme": (extreme, y)}


@pytest.mark.parametrize("case", ["random", "tied", "extreme"])
@pytest.mark.parametrize("bins", [2048, 16])
def test_histogram_metrics_match_sklearn_within_bound(case, bins):
    scores, y = _cases()[case]
    spec = HistogramSpec(bins=bins)
    m = pooled_metrics(*score_histograms(scores, y, spec))
    assert m.n == y.size and m.positives == int(y.sum())
    assert abs(m.auroc - roc_auc_score(y, scores)) <= m.auroc_error_bound + 1e-12
    assert abs(m.auprc - average_precision_score(y, scores)) <= m.auprc_error_bound + 1e-12
    # Each bin is one threshold: exactly sklearn's AP and AUROC on the bin-quantised scores.
    q = spec.bin_index(scores)
    assert m.auprc == pytest.approx(average_precision_score(y, q), abs=1e-12)
    assert m.auroc == pytest.approx(roc_auc_score(y, q), abs=1e-12)
    lo, hi = m.auroc_ci
    assert lo <= m.auroc <= hi


def test_coarse_bins_have_real_error_that_the_bounds_cover():
    scores, y = _cases()["random"]
    m = pooled_metrics(*score_histograms(scores, y, HistogramSpec(bins=4, lo=-4, hi=4)))
    err_roc = abs(m.auroc - roc_auc_score(y, scores))
    err_pr = abs(m.auprc - average_precision_score(y, scores))
    assert 1e-3 < err_roc <= m.auroc_error_bound
    assert 1e-3 < err_pr <= m.auprc_error_bound
    # Fine bins make the bounds small.
    fine = pooled_metrics(*score_histograms(scores, y, HistogramSpec(bins=4096)))
    assert fine.auroc_error_bound < 2e-3 and fine.auprc_error_bound < 5e-3


def test_auroc_error_bound_is_the_exact_formula():
    pos = np.array([3, 0, 2, 5])
    neg = np.array([4, 1, 2, 0])
    m = pooled_metrics(pos, neg)
    assert m.auroc_error_bound == pytest.approx(0.5 * (3 * 4 + 2 * 2) / (10 * 7), abs=1e-15)
    # AUROC by hand: positives beat every negative below, ties one half.
    wins = 3 * (0 + 2) + 2 * (5 + 1) + 5 * 7
    assert m.auroc == pytest.approx(wins / 70, abs=1e-15)


def test_three_sites_sum_to_the_union_exactly():
    rng = np.random.default_rng(3)
    spec = HistogramSpec(bins=512, lo=-8, hi=8)
    sites = []
    for size in (400, 1100, 37):
        y = (rng.random(size) < 0.3).astype(int)
        sites.append((rng.normal(0, 4, size) + y, y))
    hists = [score_histograms(s, y, spec) for s, y in sites]
    pos_sum = sum(h[0] for h in hists)
    neg_sum = sum(h[1] for h in hists)
    all_s = np.concatenate([s for s, _ in sites])
    all_y = np.concatenate([y for _, y in sites])
    pos_u, neg_u = score_histograms(all_s, all_y, spec)
    np.testing.assert_array_equal(pos_sum, pos_u)
    np.testing.assert_array_equal(neg_sum, neg_u)
    assert pos_u.dtype == np.int64 and neg_u.dtype == np.int64
    assert pooled_metrics(pos_sum, neg_sum) == pooled_metrics(pos_u, neg_u)


def test_delong_ci_matches_reference_without_ties():
    rng = np.random.default_rng(11)
    spec = HistogramSpec(bins=8192, lo=-16, hi=16)
    n = 600
    # Distinct bins, scores at bin centres: no two stays share a bin, so nothing is tied.
    idx = rng.choice(spec.bins, size=n, replace=False)
    centres = spec.edges()[idx] + 0.5 * (spec.hi - spec.lo) / spec.bins
    y = (rng.random(n) < 0.35).astype(int)
    order = np.argsort(rng.normal(0, 1, n) + 1.2 * y)  # informative but imperfect
    scores = np.empty(n)
    scores[order] = np.sort(centres)
    m = pooled_metrics(*score_histograms(scores, y, spec))
    auc, (lo, hi) = _delong_reference(scores, y)
    assert m.auroc_error_bound == 0.0
    assert m.auroc == pytest.approx(auc, abs=1e-12)
    assert 0.6 < auc < 0.95  # a non-degenerate interval is being compared
    assert m.auroc_ci[0] == pytest.approx(lo, abs=1e-6)
    assert m.auroc_ci[1] == pytest.approx(hi, abs=1e-6)


def test_single_class_and_empty_do_not_crash():
    spec = HistogramSpec(bins=64)
    only_pos = pooled_metrics(*score_histograms([0.1, 2.0, -3.0], [1, 1, 1], spec))
    assert only_pos.auroc is None and only_pos.auroc_ci is None
    assert only_pos.auprc == 1.0 == average_precision_score([1, 1, 1], [0.1, 2.0, -3.0])
    only_neg = pooled_metrics(*score_histograms([0.1, 2.0], [0, 0], spec))
    assert only_neg.auroc is None and only_neg.auprc is None and only_neg.positives == 0
    empty = pooled_metrics(np.zeros(64, np.int64), np.zeros(64, np.int64))
    assert empty.n == 0 and empty.auroc is None and empty.auprc is None
    one_each = pooled_metrics(*score_histograms([1.0, -1.0], [1, 0], spec))
    assert one_each.auroc == 1.0 and one_each.auroc_ci is None


def test_out_of_range_values_clamp_into_end_bins():
    spec = HistogramSpec(bins=4, lo=-2, hi=2)
    idx = spec.bin_index(np.array([-np.inf, -50, -2, -1.0, 0.0, 1.999, 2.0, 50, np.inf]))
    np.testing.assert_array_equal(idx, [0, 0, 0, 1, 2, 3, 3, 3, 3])


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda: score_histograms([np.nan, 1.0], [0, 1]), "row 0 is NaN"),
        (lambda: score_histograms([0.0, 1.0], [0, 2]), "row 1 is 2"),
        (lambda: score_histograms([0.0, 1.0], [0]), "1 labels"),
        (lambda: pooled_metrics([1, -1], [0, 0]), "bin 1"),
        (lambda: pooled_metrics([1, 0.5], [0, 0]), "bin 1"),
        (lambda: pooled_metrics([1, 2], [0, 0, 0]), "same bins"),
    ],
)
def test_bad_input_is_one_clear_error(call, needle):
    with pytest.raises(FedmergeError, match=needle):
        call()


def test_bad_spec_is_rejected():
    with pytest.raises(ValueError, match="lo < hi"):
        HistogramSpec(lo=1.0, hi=1.0)


# --- exact local metrics and reference-placed bins ------------------------------------------


def test_exact_metrics_equal_scikit_learn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from common.metrics import exact_metrics

    rng = np.random.default_rng(11)
    y = rng.integers(0, 2, 400)
    x = np.round(rng.normal(y * 0.8, 1.0), 1)  # rounding makes many ties across classes
    m = exact_metrics(x, y)
    assert m.auroc == pytest.approx(roc_auc_score(y, x), abs=1e-12)
    assert m.auprc == pytest.approx(average_precision_score(y, x), abs=1e-12)
    assert m.n == 400 and m.positives == int(y.sum())
    lo, hi = m.auroc_ci
    assert lo < m.auroc < hi


def test_reference_bins_follow_the_public_reference_and_keep_the_order():
    from common.metrics import FEDERATED_HISTOGRAM, pooled_metrics, score_histograms

    spec = FEDERATED_HISTOGRAM
    rng = np.random.default_rng(5)
    reference = rng.normal(-2.5, 1.0, 384)
    edges = spec.reference_edges(reference)
    assert edges.shape == (spec.bins - 1,) and np.all(np.diff(edges) >= 0)
    # Quantiles: each bin holds about 1/32 of the reference.
    counts = np.bincount(spec.bin_index(reference, edges), minlength=spec.bins)
    assert counts.max() - counts.min() <= 2
    # A monotone map: scores in higher bins are higher; metrics keep within the tie bound.
    y = rng.integers(0, 2, 500)
    x = rng.normal(-2.5 + y, 1.0)
    m = pooled_metrics(*score_histograms(x, y, spec, edges))
    from sklearn.metrics import roc_auc_score

    assert abs(m.auroc - roc_auc_score(y, x)) <= m.auroc_error_bound
    with pytest.raises(FedmergeError, match="31 inner edges"):
        score_histograms(x, y, spec)


def _mixture_quantiles(scores, labels, bins):
    """Quantiles of ½·F_pos + ½·F_neg by hand: the first sorted score whose cumulative mass
    reaches each level (the inverted CDF)."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], labels[order]
    mass = np.where(y == 1, 0.5 / y.sum(), 0.5 / (y.size - y.sum()))
    cumulative = np.cumsum(mass)
    return np.array([s[np.flatnonzero(cumulative >= k / bins - 1e-12)[0]]
                     for k in range(1, bins)])


def test_balanced_bins_are_the_class_balanced_quantiles_of_the_reference():
    from common.metrics import NOISY_HISTOGRAM

    spec = NOISY_HISTOGRAM
    assert spec.placement == "balanced" and spec.uses_reference
    rng = np.random.default_rng(3)
    y = (rng.random(384) < 0.18).astype(int)
    r = np.round(rng.normal(-2.5 + 1.2 * y, 1.0), 4)
    edges = spec.reference_edges(r, y)
    np.testing.assert_array_equal(edges, np.round(_mixture_quantiles(r, y, spec.bins), 4))
    # Each bin holds about 1/bins of each class's half, so positives get about half the bins
    # although they are 18% of the reference.
    bins = spec.bins
    idx = spec.bin_index(r, edges)
    share = 0.5 * (np.bincount(idx[y == 1], minlength=bins) / y.sum()
                   + np.bincount(idx[y == 0], minlength=bins) / (y.size - y.sum()))
    assert np.abs(share - 1 / bins).max() < 0.02
    pooled = HistogramSpec(bins=bins, placement="reference").reference_edges(r)
    assert (edges > np.median(r)).sum() >= (pooled > np.median(r)).sum() + bins // 8 + 1


@pytest.mark.parametrize("bins", [8, 16])
def test_balanced_bins_cut_the_noise_the_auroc_carries(bins):
    """Why noisy runs use them: the same noise per count moves the AUROC less when the bins
    sit where positives are (the delta-method sd `noisy_metrics` reports, deterministic)."""
    from common.metrics import noisy_metrics

    rng = np.random.default_rng(8)

    def cohort(n):
        y = (rng.random(n) < 0.15).astype(int)
        return rng.normal(-2.5 + 1.2 * y, 1.0), y

    (rx, ry), (x, y) = cohort(384), cohort(5000)
    sd = {}
    for placement in ("reference", "balanced"):
        spec = HistogramSpec(bins=bins, placement=placement)
        counts = score_histograms(x, y, spec, spec.reference_edges(rx, ry))
        sd[placement] = noisy_metrics(*counts, noise_variance=100.0).noise_sd
    assert sd["balanced"] < 0.92 * sd["reference"]


@pytest.mark.parametrize(
    "labels, needle",
    [(None, "one 0/1 label per reference score"),
     (np.zeros(50, dtype=int), "need both classes; found 0 positives of 50"),
     (np.full(50, 2), "one 0/1 label per reference score")],
)
def test_balanced_bins_need_the_references_labels(labels, needle):
    spec = HistogramSpec(bins=16, placement="balanced")
    with pytest.raises(FedmergeError, match=needle):
        spec.reference_edges(np.linspace(-4, 0, 50), labels)
