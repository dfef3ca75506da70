"""SLERP between two models, per tensor, with mergekit 0.1.5's conventions.

Each tensor is flattened to one vector; the angle θ comes from the unit vectors, but the
coefficients multiply the ORIGINAL tensors (norms are not restored), and nearly parallel or
opposite pairs (|dot| > 0.9995) fall back to linear interpolation. For a fixed pair the result
is α(t)·a + β(t)·b, so the dot product is the only per-tensor work that does not depend on t:
the in-place switch computes it once and reuses it for every candidate t.
"""

from __future__ import annotations

import math

import torch

from common.merge.job import TensorJob
from common.merge.methods.linear import weighted_sum

PARALLEL_THRESHOLD = 0.9995
NORM_EPS = 1e-8
_CHUNK = 1 << 20


def slerp_sums(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(a·b, a·a, b·b) of the flattened tensors, in float64, over chunks of 1M elements.

    float32 dot products drift by ~1e-5 on a few million elements, while whole-tensor float64
    copies would be model-sized temporaries. Any dtype and device: a bf16 parent converts
    chunk by chunk (bf16 → float64 is exact, so the sums equal those of its float32 copy).
    A non-finite entry makes a·a or b·b non-finite, which is how the switch detects NaN/inf
    in the same pass.
    """
    dot = sa = sb = 0.0
    with torch.no_grad():
        for ca, cb in zip(a.reshape(-1).split(_CHUNK), b.reshape(-1).split(_CHUNK), strict=True):
            ca, cb = ca.double(), cb.double()
            dot += float(torch.dot(ca, cb))
            sa += float(torch.dot(ca, ca))
            sb += float(torch.dot(cb, cb))
    return dot, sa, sb


def slerp_cosine(dot: float, sa: float, sb: float) -> float:
    """Cosine of the angle from `slerp_sums` (unnormalised if a norm is ≤ 1e-8), clamped to
    [-1, 1]."""
    na, nb = math.sqrt(sa), math.sqrt(sb)
    if na > NORM_EPS:
        dot /= na
    if nb > NORM_EPS:
        dot /= nb
    return min(1.0, max(-1.0, dot))


def slerp_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine of the angle between the flattened tensors (see `slerp_sums`)."""
    return slerp_cosine(*slerp_sums(a, b))


def slerp_coefficients(dot: float, t: float) -> tuple[float, float]:
    """(α, β) with slerp(a, b, t) = α·a + β·b for a pair whose unit vectors have inner product
    `dot`; t = 0 gives exactly (1, 0), t = 1 exactly (0, 1)."""
    if abs(dot) > PARALLEL_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return math.sin((1.0 - t) * theta) / sin_theta, math.sin(t * theta) / sin_theta


def merge_slerp(job: TensorJob) -> torch.Tensor:
    base, other = job.base, job.tensors[0]
    dot = job.cache.get("dot")
    if dot is None:
        dot = slerp_dot(base, other)
    alpha, beta = slerp_coefficients(dot, float(job.params["t"]))
    return weighted_sum([base, other], [alpha, beta])
