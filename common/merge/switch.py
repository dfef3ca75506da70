"""Switching a live model between merge coefficients in place, for the λ search.

A hospital node scores many candidate λ values; reloading or re-merging from disk for each one
would dominate its time. This object opens both parents once (memory-mapped), precomputes all
that does not depend on λ (each tensor's SLERP cosine, its group, flat views), and then writes
θ(λ) = α·a + β·b straight into the live model's parameters: no disk I/O and no temporaries, so
a switch costs about one streaming pass over three model-sized buffers.

The coefficients come from the same functions the writer uses, so `apply(lam)` reproduces
`fedmerge merge` of `MergeConfig.two_parent(a, b, method, lam)` exactly.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import FedmergeError
from common.merge.config import GROUP_FILTERS, normalize_lambda
from common.merge.methods.linear import linear_coefficients, weighted_sum
from common.merge.methods.slerp import slerp_coefficients, slerp_dot


def group_of(name: str) -> str:
    """attention / mlp / other, matching the name filters `two_parent` writes (first wins)."""
    for group, needle in GROUP_FILTERS.items():
        if needle in name:
            return group
    return "other"


@dataclass
class _Slot:
    name: str
    group: str
    target: object  # the live parameter's storage, flat
    a: object
    b: object
    dot: float | None


class InPlaceMerger:
    """Holds parents A (λ = 0, the base) and B (λ = 1) and writes θ(λ) into `.model` in place.

    `method` is "slerp" or "linear"; `device` any torch device; `dtype` defaults to float32 on
    CPU and bfloat16 on CUDA (parents are kept on the device in that dtype).
    """

    def __init__(
        self,
        parent_a: str | os.PathLike[str],
        parent_b: str | os.PathLike[str],
        *,
        method: Literal["slerp", "linear"] = "slerp",
        device="cpu",
        dtype=None,
    ):
        import torch
        from transformers import AutoModelForCausalLM

        from common.merge.checks import check_architectures, check_tensors
        from common.model_io import Checkpoint

        if method not in ("slerp", "linear"):
            raise FedmergeError(f"method: expected slerp or linear, got {method!r}")
        self.method = method
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.parent_a, self.parent_b = Path(parent_a), Path(parent_b)
        ckpt_a, ckpt_b = Checkpoint(self.parent_a), Checkpoint(self.parent_b)
        check_architectures([ckpt_a, ckpt_b])
        plans = check_tensors([ckpt_a, ckpt_b], keep_base_vocab=False)

        self.model = AutoModelForCausalLM.from_pretrained(self.parent_a, dtype=dtype)
        self.model.to(self.device).eval()
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))

        self._slots: list[_Slot] = []
        with torch.no_grad():
            for tp in plans:
                if not tp.is_float:
                    continue
                target = params.get(tp.name)
                if target is None:
                    raise FedmergeError(
                        f"{self.parent_a}: tensor {tp.name} has no parameter in the loaded "
                        f"{type(self.model).__name__}"
                    )
                a = self._load(ckpt_a, tp.name)
                b = self._load(ckpt_b, tp.name)
                dot = slerp_dot(a, b) if method == "slerp" else None
                self._slots.append(
                    _Slot(tp.name, group_of(tp.name), target.data.view(-1), a, b, dot)
                )
        self._ckpts = (ckpt_a, ckpt_b)
        self.lam: float | dict[str, float] | None = None

    def _load(self, ckpt, name: str):
        """A parent tensor on the device, flat and contiguous; on CPU in fp32 this stays the
        memory-mapped file (pages are read once, on the first switch, and then stay cached)."""
        import torch

        t = ckpt.get(name).to(device=self.device, dtype=self.dtype).reshape(-1).contiguous()
        if not bool(torch.isfinite(t).all()):
            kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
            raise FedmergeError(
                f"{ckpt.tensors[name].file}: tensor {name} contains {kind}; parents must be finite"
            )
        return t

    @property
    def tensor_names(self) -> list[str]:
        return [s.name for s in self._slots]

    def coefficients(self, lam: float | Mapping[str, float]) -> list[tuple[float, float]]:
        """(α, β) per tensor for this λ; validates λ (slerp needs [0, 1])."""
        lams = normalize_lambda(lam, self.method)
        out = []
        for s in self._slots:
            t = lams if isinstance(lams, float) else lams[s.group]
            if self.method == "slerp":
                out.append(slerp_coefficients(s.dot, t))
            else:
                alpha, beta = linear_coefficients([1.0 - t, t], True, s.name)
                out.append((alpha, beta))
        return out

    def apply(self, lam: float | Mapping[str, float]) -> None:
        """Write θ(λ) into the live model: λ = 0 is parent A, 1 is parent B."""
        import torch

        coeffs = self.coefficients(lam)
        with torch.no_grad():
            for s, (alpha, beta) in zip(self._slots, coeffs, strict=True):
                weighted_sum([s.a, s.b], [alpha, beta], out=s.target)
        self.lam = lam if isinstance(lam, float | int) else dict(lam)

    def close(self) -> None:
        for c in self._ckpts:
            c.close()
