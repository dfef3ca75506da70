"""DARE: drop each task-vector entry at random (keep with probability `density`), optionally
rescale so the delta's L1 norm is unchanged (mergekit 0.1.5, not 1/density), then merge linearly
(`dare_linear`) or with TIES sign election (`dare_ties`).

The keep-mask of each (model, tensor) comes from its own generator seeded from the run seed,
the model's position and the tensor name, so a merge is reproducible whatever the order in
which tensors are processed, and a test can regenerate exactly the same masks.
"""

from __future__ import annotations

import hashlib

import torch

from common.merge.job import TensorJob
from common.merge.methods.task_arithmetic import combine_deltas


def dare_keep_mask(seed: int, model_index: int, name: str, shape, density: float) -> torch.Tensor:
    """Boolean keep-mask, Bernoulli(density) per entry, deterministic in (seed, model, name)."""
    key = hashlib.sha256(f"{seed}:{model_index}:{name}".encode()).digest()
    gen = torch.Generator(device="cpu").manual_seed(int.from_bytes(key[:8], "little") >> 1)
    return torch.rand(tuple(shape), generator=gen, dtype=torch.float32) < density


def dare_sparsify(
    delta: torch.Tensor, keep: torch.Tensor, density: float, rescale: bool
) -> torch.Tensor:
    if density >= 1.0:
        return delta
    kept = torch.where(keep.to(delta.device), delta, 0.0)
    if not rescale:
        return kept
    before = float(delta.abs().sum(dtype=torch.float64))
    after = float(kept.abs().sum(dtype=torch.float64))
    if before < 1e-8 or after < 1e-8:
        return kept
    return kept * (before / after)


def _dare(job: TensorJob, consensus: bool) -> torch.Tensor:
    rescale = bool(job.params["rescale"])
    deltas = []
    for i, (x, p) in enumerate(zip(job.tensors, job.model_params, strict=True)):
        keep = dare_keep_mask(job.seed, i, job.name, x.shape, p["density"])
        deltas.append(dare_sparsify(x - job.base, keep, p["density"], rescale))
    return combine_deltas(
        job.base,
        deltas,
        [p["weight"] for p in job.model_params],
        consensus=consensus,
        normalize=bool(job.params["normalize"]),
        lam=float(job.params["lambda"]),
    )


def merge_dare_linear(job: TensorJob) -> torch.Tensor:
    return _dare(job, consensus=False)


def merge_dare_ties(job: TensorJob) -> torch.Tensor:
    return _dare(job, consensus=True)
