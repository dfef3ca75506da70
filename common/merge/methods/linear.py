"""Linear merge (model soup): Σ wᵢ·xᵢ, divided by Σ wᵢ when normalising.

The weighted sum is also the kernel every two-parent merge reduces to (SLERP is α·a + β·b with
per-tensor scalars), so the writer and the in-place switch share it and agree bit for bit.
"""

from __future__ import annotations

import torch

from common.errors import FedmergeError
from common.merge.job import TensorJob


def linear_coefficients(weights: list[float], normalize: bool, name: str = "") -> list[float]:
    """Per-model scalars, in float64, so rounding happens once, in the tensor op."""
    if not normalize:
        return [float(w) for w in weights]
    total = sum(float(w) for w in weights)
    if abs(total) < 1e-8:
        raise FedmergeError(
            f"parameters.weight: weights sum to {total} for tensor {name}; "
            "with normalize: true they must not sum to zero"
        )
    return [float(w) / total for w in weights]


def weighted_sum(tensors: list[torch.Tensor], coeffs: list[float], out: torch.Tensor | None = None):
    """Σ cᵢ·tᵢ written into `out` without temporaries: one multiply, then fused add-scaled.

    Two passes over `out` stream fewer bytes than building products and summing them, which
    is what makes the in-place switch bandwidth-bound rather than allocator-bound.
    """
    with torch.no_grad():
        if out is None:
            out = torch.empty_like(tensors[0])
        torch.mul(tensors[0], coeffs[0], out=out)
        for t, c in zip(tensors[1:], coeffs[1:], strict=True):
            out.add_(t, alpha=c)
    return out


def merge_linear(job: TensorJob) -> torch.Tensor:
    weights = [p["weight"] for p in job.model_params]
    coeffs = linear_coefficients(weights, bool(job.params["normalize"]), job.name)
    return weighted_sum(job.tensors, coeffs)
