"""AUROC, AUPRC, their binning error and a DeLong CI, from two histograms alone.

Everything here is a function of per-bin counts, so it gives the same answer whether the counts
came from one site or from a secure sum over many. Bins are ordered by score: a positive in a
higher bin than a negative is ranked above it exactly as on the raw scores; only pairs that share
a bin lose their order, and those are counted one half (the Mann-Whitney convention for ties).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

from common.errors import FedmergeError

# Two-sided 95% normal quantile, Φ⁻¹(0.975); a constant so metrics need no scipy.
Z_95 = 1.959963984540054


class PooledMetrics(BaseModel):
    """Metrics of the scores summarised by (pos, neg) histograms.

    `auroc` is None unless both classes are present. `auprc` (step-wise average precision, as
    scikit-learn's average_precision_score) is None without positives; with positives but no
    negatives every threshold has precision 1, so it is 1.0 (also what scikit-learn returns),
    which equals the positive rate, i.e. chance level. `auroc_error_bound` bounds |histogram
    AUROC − AUROC of the raw scores| exactly; `auprc_error_bound` does the same for AUPRC.
    `auroc_ci` is DeLong's 95% interval (clipped to [0, 1]); None with fewer than two of either
    class, where DeLong's sample variances are undefined.
    """

    model_config = ConfigDict(frozen=True)

    n: int
    positives: int
    auroc: float | None
    auprc: float | None
    auroc_error_bound: float
    auprc_error_bound: float = 0.0
    auroc_ci: tuple[float, float] | None
    # Standard deviation the privacy noise adds to `auroc` (0 for exact counts).
    noise_sd: float = 0.0


def _counts(hist, name: str) -> np.ndarray:
    a = np.asarray(hist)
    if a.ndim != 1:
        raise FedmergeError(f"histogram {name}: shape {a.shape}; expected one count per bin (1-D)")
    if a.size and not np.all(np.isfinite(a)):
        raise FedmergeError(f"histogram {name}: non-finite count; expected non-negative integers")
    if a.size and (np.any(a < 0) or np.any(a != np.round(a))):
        bad = int(np.flatnonzero((a < 0) | (a != np.round(a)))[0])
        raise FedmergeError(
            f"histogram {name}: bin {bad} holds {a[bad].item()!r}; "
            "expected a non-negative integer count"
        )
    return np.round(a).astype(np.float64)


def pooled_metrics(pos, neg) -> PooledMetrics:
    """All metrics from per-bin counts of positives and negatives (bins in ascending score)."""
    p = _counts(pos, "pos")
    q = _counts(neg, "neg")
    if p.shape != q.shape:
        raise FedmergeError(
            f"histograms: pos has {p.size} bins but neg has {q.size}; expected the same bins"
        )
    n_pos, n_neg = float(p.sum()), float(q.sum())
    auprc, auprc_bound = _auprc(p, q, n_pos)
    base = dict(n=int(n_pos + n_neg), positives=int(n_pos), auprc=auprc,
                auprc_error_bound=auprc_bound)
    if n_pos == 0 or n_neg == 0:
        return PooledMetrics(**base, auroc=None, auroc_error_bound=0.0, auroc_ci=None)

    neg_below = np.cumsum(q) - q
    pos_above = np.cumsum(p[::-1])[::-1] - p
    # Placements: the share of the other class each score beats, ties one half. They are the
    # same for every score in a bin, so DeLong's per-score sums become per-bin weighted sums.
    v10 = (neg_below + 0.5 * q) / n_neg  # each positive in bin b
    v01 = (pos_above + 0.5 * p) / n_pos  # each negative in bin b
    auroc = float((p * v10).sum() / n_pos)
    bound = float(0.5 * (p * q).sum() / (n_pos * n_neg))
    ci = None
    if n_pos >= 2 and n_neg >= 2:
        s10 = float((p * (v10 - auroc) ** 2).sum() / (n_pos - 1))
        s01 = float((q * (v01 - auroc) ** 2).sum() / (n_neg - 1))
        half = Z_95 * np.sqrt(s10 / n_pos + s01 / n_neg)
        ci = (float(max(0.0, auroc - half)), float(min(1.0, auroc + half)))
    return PooledMetrics(**base, auroc=auroc, auroc_error_bound=bound, auroc_ci=ci)


def _auprc(p: np.ndarray, q: np.ndarray, n_pos: float) -> tuple[float | None, float]:
    """Average precision with each bin as one threshold, and its exact binning error bound."""
    if n_pos == 0:
        return None, 0.0
    # Cumulative counts from the top bin down: a threshold at bin b keeps bins >= b.
    tp = np.cumsum(p[::-1])[::-1]
    fp = np.cumsum(q[::-1])[::-1]
    hit = p > 0
    ap = float((p[hit] / n_pos * tp[hit] / (tp[hit] + fp[hit])).sum())
    return ap, auprc_error_bound(p, q)


def auprc_error_bound(pos, neg) -> float:
    """Largest possible |AP(bins) − AP(raw scores)| given only the histograms.

    In bin b let a, c be the positives and negatives in higher bins and p, m its own counts.
    On the raw scores, the i-th positive of the bin is scored at the end of its tie group, where
    a + i <= TP <= a + p and c <= FP <= c + m; precision rises with TP and falls with FP, so its
    precision lies in [(a+i)/(a+i+c+m), (a+p)/(a+p+c)]. The bin-level value gives every one of
    the p positives (a+p)/(a+p+c+m), which lies inside that range; the bound adds, per bin, the
    larger distance to either end, over the number of positives.
    """
    p = np.asarray(pos, dtype=np.float64)
    q = np.asarray(neg, dtype=np.float64)
    n_pos = p.sum()
    if n_pos == 0:
        return 0.0
    above_p = np.cumsum(p[::-1])[::-1] - p
    above_n = np.cumsum(q[::-1])[::-1] - q
    hit = np.flatnonzero(p > 0)
    a, c, k, m = above_p[hit], above_n[hit], p[hit], q[hit]
    binned = k * (a + k) / (a + k + c + m)
    upper = k * (a + k) / (a + k + c)
    # Lower end: sum over i = 1..k of (a+i)/(a+i+c+m), expanded per positive.
    counts = k.astype(np.int64)
    rank = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts) + 1.0
    a_i, cm_i = np.repeat(a, counts) + rank, np.repeat(c + m, counts)
    lower = np.bincount(np.repeat(np.arange(hit.size), counts), weights=a_i / (a_i + cm_i),
                        minlength=hit.size)
    return float(np.maximum(upper - binned, binned - lower).sum() / n_pos)
