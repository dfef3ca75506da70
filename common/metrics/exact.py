"""Exact AUROC, AUPRC and DeLong CI of raw scores: what a site reports about its own data.

A local command holds every score, so it has no reason to bin: each distinct score becomes
its own bin, which makes the histogram formulas exact (stays with equal scores are true ties,
counted one half as scikit-learn does) and keeps one implementation of DeLong's variance.
"""

from __future__ import annotations

import numpy as np

from common.metrics.pooled import PooledMetrics, pooled_metrics


def exact_metrics(scores, labels) -> PooledMetrics:
    """Metrics equal to scikit-learn's roc_auc_score / average_precision_score on `scores`."""
    x = np.asarray(scores, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1).astype(bool)
    values, index = np.unique(x, return_inverse=True)
    pos = np.bincount(index[y], minlength=values.size)
    neg = np.bincount(index[~y], minlength=values.size)
    return pooled_metrics(pos, neg)
