"""Per-site score histograms over bins every site shares.

Pooled AUROC and AUPRC depend on the scores only through how positives and negatives are
ordered; counting each class per bin keeps that order up to ties inside a bin, and counts add.
So a secure SUM of per-site histograms gives the union's metrics without any site revealing a
single score. Bins live in log-odds space because probabilities near 0 or 1 crowd together and
would share a bin, while log-odds spread them out.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import FedmergeError

# The public reference cohort whose scores place the bins: the built-in synthetic generator
# (every site regenerates the same 384 stays from this spec; nothing to download or trust).
DEFAULT_REFERENCE = "synthetic:sites=3,seed=202,stays=128"
# Reference edges are rounded so that fp32 noise between two sites' scorings of the same
# reference (~1e-7 in log-odds) almost never puts an edge on different sides of a value.
EDGE_DECIMALS = 4


Placement = Literal["uniform", "reference", "balanced"]
REFERENCE_PLACEMENTS = ("reference", "balanced")


class HistogramSpec(BaseModel):
    """How a site turns log-odds into counts; every site must use the same spec.

    `uniform`: equal-width bins over [lo, hi). `reference`: the bins - 1 inner edges are
    quantiles (1/bins, ..., (bins-1)/bins) of a PUBLIC reference cohort's log-odds, scored by
    the same merge at the same λ: the bins follow where the scores fall (32 of them do what
    ~500 equal-width bins do, `bench/privacy_accuracy.py`), and they depend on no site's data,
    so they reveal nothing and cannot be aimed at a patient by the coordinator. `balanced`:
    the same, with the reference's two classes weighted equally (quantiles of ½·F_pos +
    ½·F_neg), i.e. bins evenly spaced along the ROC curve instead of along the score
    distribution, which at 10-20% mortality is mostly survivors. Why, under noise: each
    positive count moves the AUROC by about (share of negatives below it − AUROC)/positives,
    so noise in bins where positives sit, whose share of negatives below is near the AUROC,
    costs least; the pooled quantiles put most bins among survivors, where it costs most.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    bins: int = Field(default=2048, ge=1)
    lo: float = -16.0
    hi: float = 16.0
    placement: Placement = "uniform"
    reference: str = DEFAULT_REFERENCE

    @model_validator(mode="after")
    def _ordered(self) -> HistogramSpec:
        if not (np.isfinite(self.lo) and np.isfinite(self.hi) and self.lo < self.hi):
            raise ValueError(f"HistogramSpec: need finite lo < hi, got lo={self.lo}, hi={self.hi}")
        return self

    def edges(self) -> np.ndarray:
        """The bins + 1 edges; the first and last bins also take everything beyond them."""
        return np.linspace(self.lo, self.hi, self.bins + 1)

    @property
    def uses_reference(self) -> bool:
        return self.placement in REFERENCE_PLACEMENTS

    def reference_edges(self, reference_log_odds, reference_labels=None) -> np.ndarray:
        """The bins - 1 inner edges from the reference's scores (first/last bins open);
        `balanced` placement also needs the reference's labels."""
        r = np.asarray(reference_log_odds, dtype=np.float64).reshape(-1)
        if r.size < 2 or not np.all(np.isfinite(r)):
            raise FedmergeError(
                f"histogram reference {self.reference}: {r.size} scores, expected at least 2 "
                "finite log-odds"
            )
        levels = np.arange(1, self.bins) / self.bins
        if self.placement != "balanced":
            return np.round(np.quantile(r, levels), EDGE_DECIMALS)
        y = None if reference_labels is None else np.asarray(reference_labels).reshape(-1)
        if y is None or y.shape != r.shape or not np.isin(y, (0, 1)).all():
            raise FedmergeError(
                f"histogram reference {self.reference}: balanced bins need one 0/1 label per "
                f"reference score ({r.size} scores)"
            )
        positives = int(y.sum())
        if positives == 0 or positives == y.size:
            raise FedmergeError(
                f"histogram reference {self.reference}: balanced bins need both classes; "
                f"found {positives} positives of {y.size}"
            )
        # Each class carries half the mass. numpy's weighted quantile (inverted CDF: every
        # edge is one of the reference's own scores) is the maintained implementation.
        weights = np.where(y == 1, 0.5 / positives, 0.5 / (y.size - positives))
        edges = np.quantile(r, levels, weights=weights, method="inverted_cdf")
        return np.round(edges, EDGE_DECIMALS)

    def bin_index(self, log_odds: np.ndarray, inner_edges: np.ndarray | None = None
                  ) -> np.ndarray:
        """Bin of each value; out-of-range values clamp into the end bins so none is dropped.

        Clamping keeps the map monotone (non-decreasing), which is what the metrics need:
        scores in different bins stay correctly ordered, only same-bin pairs become ties.
        """
        x = np.asarray(log_odds, dtype=np.float64)
        if np.isnan(x).any():
            row = int(np.flatnonzero(np.isnan(x))[0])
            raise FedmergeError(f"scores: row {row} is NaN; expected a finite or ±inf log-odds")
        if self.uses_reference:
            if inner_edges is None or len(inner_edges) != self.bins - 1:
                raise FedmergeError(
                    f"histogram: reference bins need {self.bins - 1} inner edges from "
                    f"{self.reference}'s scores"
                )
            return np.searchsorted(np.asarray(inner_edges), x, side="right").astype(np.int64)
        width = (self.hi - self.lo) / self.bins
        # Clip before flooring so ±inf and huge values never overflow the integer cast.
        pos = np.clip((x - self.lo) / width, 0.0, self.bins - 1)
        return np.floor(pos).astype(np.int64)


def score_histograms(
    log_odds, labels, spec: HistogramSpec | None = None, inner_edges=None
) -> tuple[np.ndarray, np.ndarray]:
    """Counts of positives and of negatives per bin (int64 arrays of length `spec.bins`);
    reference bins take the edges from `HistogramSpec.reference_edges`."""
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
    idx = spec.bin_index(x, inner_edges)
    is_pos = y.astype(bool)
    pos = np.bincount(idx[is_pos], minlength=spec.bins).astype(np.int64)
    neg = np.bincount(idx[~is_pos], minlength=spec.bins).astype(np.int64)
    return pos, neg
