"""AUROC and AUPRC from score histograms, so sites can sum statistics instead of pooling scores."""

from common.metrics.exact import exact_metrics
from common.metrics.histogram import DEFAULT_REFERENCE, HistogramSpec, score_histograms
from common.metrics.noisy import noisy_metrics, noisy_round_metrics
from common.metrics.pooled import PooledMetrics, auprc_error_bound, pooled_metrics

# What a federation releases by default: bins placed by a public reference cohort; 32 of them at
# its score quantiles for exact sums, 8 at its class-balanced quantiles under differential
# privacy. Why fewer with noise: each bin carries its own noise, so the noise's share of the AUROC
# error grows with the bins while binning's (ties inside a bin, a bias toward 0.5) shrinks.
# bench/privacy_accuracy.py, two runs, 16 → 8 balanced bins: on the eICU demo's 1,265-stay tuning
# fold at ε = 8 the smoothed curve's error 0.020/0.019 → 0.016/0.017 and λ* regret 0.0042/0.0057 →
# 0.0034/0.0038 (at ε = 4: 0.033 → 0.026/0.030, regret 0.019/0.014 → 0.009); on the 322-stay
# synthetic fold at ε = 8 error 0.029/0.030 → 0.023; on a 10,020-stay fold at ε = 1 regret
# unchanged within noise (0.0031/0.0040 → 0.0035). The price is the tie bias where the noise is
# small: that fold at ε = 8 reads its AUROC 0.0055 off (0.0022 with 16 bins) and its AUPRC 0.050
# off (0.027), λ* unaffected. A site or recipe that wants more bins names them. Why balanced with
# noise: the noise costs the AUROC least in the bins where positives sit (`HistogramSpec`).
# Without noise neither placement wins everywhere (worst AUROC error over the 11 λ: 0.0033 at the
# score quantiles against 0.0031 balanced on the synthetic fold, 0.0022 against 0.0025 on the eICU
# demo's), so exact runs keep theirs.
FEDERATED_HISTOGRAM = HistogramSpec(bins=32, placement="reference")
NOISY_HISTOGRAM = HistogramSpec(bins=8, placement="balanced")


def default_histogram(noisy: bool) -> HistogramSpec:
    """The histogram spec a run uses unless its recipe (or a site's policy) names one."""
    return NOISY_HISTOGRAM if noisy else FEDERATED_HISTOGRAM


__all__ = [
    "DEFAULT_REFERENCE",
    "FEDERATED_HISTOGRAM",
    "HistogramSpec",
    "NOISY_HISTOGRAM",
    "default_histogram",
    "PooledMetrics",
    "auprc_error_bound",
    "exact_metrics",
    "noisy_metrics",
    "noisy_round_metrics",
    "pooled_metrics",
    "score_histograms",
]
