"""Histograms ⇄ the one integer vector a hospital sends through SecAgg+, summed exactly.

Flower's SecAgg+ computes a weighted MEAN of float vectors after clipping and quantizing
them. It is an exact integer SUM only under conditions this module fixes and checks:
- every site reports the same weight (`num_examples == max_weight`), so the mean times the
  number of results is the sum;
- `quantization_range / (2 * clipping_range)` is an integer (here 1), so integer inputs
  quantize without rounding (the stochastic rounding then never moves them);
- sites × quantization_range < modulus_range, so the masked sum never wraps.
Flower clips values outside ±clipping_range SILENTLY, so the encoder refuses them instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from common.errors import FedmergeError

CLIPPING_RANGE = float(2**20)
QUANTIZATION_RANGE = 2**21
MODULUS_RANGE = 2**32
# The constant example count every site reports; `max_weight` equals it.
SITE_WEIGHT = 1


class ExactSumSettings(BaseModel):
    """SecAgg+ quantization settings under which integer vectors sum exactly."""

    model_config = ConfigDict(frozen=True)

    clipping_range: float = Field(default=CLIPPING_RANGE, gt=0)
    quantization_range: int = Field(default=QUANTIZATION_RANGE, gt=0)
    modulus_range: int = Field(default=MODULUS_RANGE, gt=0)

    @model_validator(mode="after")
    def _exact(self) -> ExactSumSettings:
        step = self.quantization_range / (2 * self.clipping_range)
        if step != int(step) or step < 1:
            raise ValueError(
                f"quantization_range/(2*clipping_range) = {step}, expected an integer >= 1 "
                "(integers would otherwise be rounded)"
            )
        if self.quantization_range >= 2**31:
            raise ValueError(f"quantization_range={self.quantization_range}, expected < 2**31")
        if self.modulus_range > 2**32 or self.modulus_range & (self.modulus_range - 1):
            raise ValueError(f"modulus_range={self.modulus_range}, expected a power of 2 <= 2**32")
        return self

    @property
    def max_sites(self) -> int:
        """Most sites whose sum cannot wrap around the modulus."""
        return (self.modulus_range - 1) // self.quantization_range

    @property
    def max_count(self) -> int:
        """Largest per-site entry that is not clipped."""
        return int(self.clipping_range)

    def check_sites(self, sites: int) -> None:
        if sites > self.max_sites:
            raise FedmergeError(
                f"secure sum: {sites} sites, expected at most {self.max_sites} for "
                f"quantization_range={self.quantization_range} and "
                f"modulus_range={self.modulus_range} (the sum would wrap)"
            )


def encode_histograms(
    histograms: Sequence[tuple[np.ndarray, np.ndarray]],
    bins: int,
    settings: ExactSumSettings | None = None,
    *,
    noisy: bool = False,
) -> np.ndarray:
    """Concatenate (positives, negatives) per candidate into one float64 vector of counts.

    Refuses anything Flower would clip or round: non-integers, negatives, counts above the
    clipping range, or a wrong number of bins. `noisy` counts (differential privacy) may be
    negative: Flower's quantizer maps [-clip, clip] to the field, so they still sum exactly.
    """
    settings = settings or ExactSumSettings()
    floor = -settings.max_count if noisy else 0
    parts: list[np.ndarray] = []
    for i, (pos, neg) in enumerate(histograms):
        for name, hist in (("positives", pos), ("negatives", neg)):
            arr = np.asarray(hist)
            if arr.shape != (bins,):
                raise FedmergeError(
                    f"secure sum: candidate {i} {name} histogram has shape {arr.shape}, "
                    f"expected ({bins},)"
                )
            if not np.issubdtype(arr.dtype, np.integer):
                raise FedmergeError(
                    f"secure sum: candidate {i} {name} histogram has dtype {arr.dtype}, "
                    "expected integer counts"
                )
            if arr.size and (arr.min() < floor or arr.max() > settings.max_count):
                raise FedmergeError(
                    f"secure sum: candidate {i} {name} counts span [{arr.min()}, {arr.max()}], "
                    f"expected within [{floor}, {settings.max_count}] (SecAgg+ would clip "
                    "silently)"
                )
            parts.append(arr.astype(np.float64))
    if not parts:
        raise FedmergeError("secure sum: no histograms to encode, expected at least one candidate")
    return np.concatenate(parts)


def decode_sum(
    mean_vector: np.ndarray, n_results: int, candidates: int, bins: int, *, noisy: bool = False,
    max_count: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Turn SecAgg+'s mean over `n_results` sites back into summed int64 histograms.

    The mean of integers times their number is an integer up to float rounding of the 1/n
    factor; anything further off means the sum was not exact (wrong settings or masks that did
    not cancel), which is an error, never something to round away. `max_count`: the largest
    entry one site can send unclipped (`ExactSumSettings.max_count`); a count past
    `n_results` of them cannot be a sum. Masks that did not cancel (sites sent different
    instructions, so their masks were bound to different rounds; or ends of different
    versions) leave words uniform over the modulus, nearly all of them past that bound,
    while noisy counts may be negative and so pass the exact-sum checks.
    """
    vec = np.asarray(mean_vector, dtype=np.float64).reshape(-1)
    if vec.size != candidates * 2 * bins:
        raise FedmergeError(
            f"secure sum: aggregate has {vec.size} entries, expected "
            f"{candidates} candidates x 2 classes x {bins} bins = {candidates * 2 * bins}"
        )
    total = vec * n_results
    counts = np.rint(total)
    worst = float(np.max(np.abs(total - counts))) if total.size else 0.0
    if worst > 1e-3 or (not noisy and counts.size and counts.min() < 0):
        raise FedmergeError(
            f"secure sum: aggregate is not an exact non-negative integer sum (max deviation "
            f"{worst:.3g}, min {counts.min():.0f}); the SecAgg+ settings are wrong or the masks "
            "did not cancel (sites sent different instructions, or coordinator and sites of "
            "different fedmerge versions)"
        )
    if max_count is not None and counts.size and np.abs(counts).max() > n_results * max_count:
        raise FedmergeError(
            f"secure sum: counts up to {np.abs(counts).max():.0f}, more than {n_results} sites "
            f"can sum ({n_results} x {max_count}): the masks did not cancel (sites sent "
            "different instructions, or coordinator and sites of different fedmerge versions)"
        )
    counts = counts.astype(np.int64).reshape(candidates, 2, bins)
    return [(counts[i, 0].copy(), counts[i, 1].copy()) for i in range(candidates)]
