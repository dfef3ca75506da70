"""AUROC and AUPRC from score histograms, so sites can sum statistics instead of pooling scores."""

from common.metrics.exact import exact_metrics
from common.metrics.histogram import DEFAULT_REFERENCE, HistogramSpec, score_histograms
from common.metrics.noisy import noisy_metrics
from common.metrics.pooled import PooledMetrics, auprc_error_bound, pooled_metrics

# What a federation releases by default: 32 bins placed by a public reference cohort.
FEDERATED_HISTOGRAM = HistogramSpec(bins=32, placement="reference")

__all__ = [
    "DEFAULT_REFERENCE",
    "FEDERATED_HISTOGRAM",
    "HistogramSpec",
    "PooledMetrics",
    "auprc_error_bound",
    "exact_metrics",
    "noisy_metrics",
    "pooled_metrics",
    "score_histograms",
]
