"""AUROC and AUPRC from score histograms, so sites can sum statistics instead of pooling scores."""

from common.metrics.histogram import HistogramSpec, score_histograms
from common.metrics.pooled import PooledMetrics, auprc_error_bound, pooled_metrics

__all__ = [
    "HistogramSpec",
    "PooledMetrics",
    "auprc_error_bound",
    "pooled_metrics",
    "score_histograms",
]
