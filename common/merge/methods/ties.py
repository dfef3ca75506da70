"""TIES: keep each task vector's largest-magnitude entries, elect a sign per entry, merge the
agreeing ones (mergekit 0.1.5 semantics: top int(density·numel), at least one, no rescale)."""

from __future__ import annotations

import torch

from common.merge.job import TensorJob
from common.merge.methods.task_arithmetic import combine_deltas


def magnitude_sparsify(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the top max(1, int(density·numel)) entries of |delta|."""
    if density >= 1.0:
        return delta
    k = max(1, int(density * delta.numel()))
    flat = delta.reshape(-1)
    keep = torch.topk(flat.abs(), k, sorted=False).indices
    out = torch.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def merge_ties(job: TensorJob) -> torch.Tensor:
    deltas = [
        magnitude_sparsify(x - job.base, p["density"])
        for x, p in zip(job.tensors, job.model_params, strict=True)
    ]
    return combine_deltas(
        job.base,
        deltas,
        [p["weight"] for p in job.model_params],
        consensus=True,
        normalize=bool(job.params["normalize"]),
        lam=float(job.params["lambda"]),
    )
