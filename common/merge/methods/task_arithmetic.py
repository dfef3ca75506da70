"""Task arithmetic: base + λ·Σ wᵢ·(xᵢ − base), and the delta-combining step TIES/DARE share.

The family differs only in how each task vector is sparsified and whether signs are elected,
so the combining step lives here once, with mergekit 0.1.5's order of operations: weight,
(elect signs), sum, divide by the weight total when normalising, scale by λ, add to base.
"""

from __future__ import annotations

import torch

from common.merge.job import TensorJob


def combine_deltas(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """Merge task vectors onto `base`.

    With `consensus` (TIES), each entry keeps only the weighted deltas whose sign agrees with
    the sign of their sum (a zero sum counts as positive); the divisor is then the total weight
    of the kept entries per element (1 where none is kept). Without it the divisor is Σ wᵢ
    (1 when |Σ wᵢ| < 1e-8).
    """
    with torch.no_grad():
        weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
        if consensus:
            total = torch.stack(weighted).sum(dim=0)
            majority = torch.where(total >= 0, 1.0, -1.0).to(base.dtype)
            mixed = torch.zeros_like(base)
            divisor = torch.zeros_like(base)
            for wd, w in zip(weighted, weights, strict=True):
                keep = torch.sign(wd) == majority
                mixed += torch.where(keep, wd, 0.0)
                divisor += keep.to(base.dtype) * w
            divisor[divisor == 0] = 1.0
        else:
            mixed = torch.stack(weighted).sum(dim=0)
            total_w = sum(weights)
            divisor = 1.0 if abs(total_w) < 1e-8 else total_w
        if normalize:
            mixed = mixed / divisor
        if lam != 1.0:
            mixed = mixed * lam
        return base + mixed


def merge_task_arithmetic(job: TensorJob) -> torch.Tensor:
    deltas = [x - job.base for x in job.tensors]
    return combine_deltas(
        job.base,
        deltas,
        [p["weight"] for p in job.model_params],
        consensus=False,
        normalize=bool(job.params["normalize"]),
        lam=float(job.params["lambda"]),
    )
