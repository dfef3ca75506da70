"""Per-site score histograms over bins every site shares.

Pooled AUROC and AUPRC depend on the scores only through how positives and negatives are
ordered; counting each class per bin keeps that order up to ties inside a bin, and counts add.
So a secure SUM of per-site histograms gives the union's metrics without any site revealing a
single score. Bins live in log-odds space because probabilities near 0 or 1 crowd together and
would share a bin, while log-odds spread them out.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import FedmergeError


class HistogramSpec(BaseModel):
    """Equal-width bins over [lo, hi) in log-odds; every site must use the same spec."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    bins: int = Field(default=2048, ge=1)
    lo: float = -16.0
    hi: float = 16.0

    @model_validator(mode="after")
    def _ordered(self) -> HistogramSpec:
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"HistogramSpec: need finite lo < hi, got lo={self.lo}, hi={self.hi}")
        return self

    def edges(self) -> np.ndarray:
        """The bins + 1 edges; the first and last bins also take everything beyond them."""
        return np.linspace(self.lo, self.hi, self.bins + 1)

    def bin_index(self, log_odds: np.ndarray) -> np.ndarray:
        """Bin of each value; out-of-range values clamp into the end bins so none is dropped.

        Clamping keeps the map monotone (non-decreasing), which is what the metrics need:
        scores in different bins stay correctly ordered, only same-bin pairs become ties.
        """
        x = np.asarray(log_odds, dtype=np.float64)
        if np.isnan(x).any():
            row = int(np.flatnonzero(np.isnan(x))[0])
            raise FedmergeError(f"scores: row {row} is NaN; expected a finite or ±inf log-odds")
        width = (self.hi - self.lo) / self.bins
        # Clip before flooring so ±inf and huge values never overflow the integer cast.
        pos = np.clip((x - self.lo) / width, 0.0, self.bins - 1)
        return np.floor(pos).astype(np.int64)


def score_histograms(
    log_odds, labels, spec: HistogramSpec | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positives and of negatives per bin (int64 arrays of length `spec.bins`)."""
    spec = spec or HistogramSpec()
    x = np.asarray(log_odds, dtype=np.float64).reshape(-1)
    y = np.asarray(labels).reshape(-1)
    if x.shape != y.shape:
        raise FedmergeError(
            f"scores: {x.size} log-odds but {y.size} labels; expected one label per score"
        )
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise FedmergeError(f"labels: row {row} is {y[row].item()!r}; expected 0 or 1")
    idx = spec.bin_index(x)
    is_pos = y.astype(bool)
    pos = np.bincount(idx[is_pos], minlength=spec.bins).astype(np.int64)
    neg = np.bincount(idx[~is_pos], minlength=spec.bins).astype(np.int64)
    return pos, neg
