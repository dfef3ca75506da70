"""Switching a live model between merge coefficients in place, for the λ search.

A hospital node scores many candidate λ values; reloading or re-merging from disk for each one
would dominate its time. This object opens both parents once, precomputes all that does not
depend on λ (each tensor's SLERP cosine, its group), and then writes θ(λ) = α·a + β·b straight
into the live model's parameters, tensor by tensor.

Memory is one live model plus the parents where they are cheap: their memory-mapped files in
their own dtype (bf16 for most LLMs), never a converted copy. When the parents' dtype is the
compute dtype the switch reads the mapped files directly (one streaming pass over three
model-sized buffers); otherwise it converts chunk by chunk through two small buffers
(`common.merge.stream`). On CUDA the live model is on the device; the parents join it only
when they fit in the free memory with a margin, and otherwise stream from the host through
pinned buffers (`placement` says which, `placement_reason` why).

The coefficients come from the same functions the writer uses, so `apply(lam)` reproduces
`fedmerge merge` of `MergeConfig.two_parent(a, b, method, lam)` exactly.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from common.errors import FedmergeError
from common.merge.config import GROUP_FILTERS, normalize_lambda
from common.merge.methods.linear import linear_coefficients
from common.merge.methods.slerp import slerp_coefficients, slerp_cosine, slerp_sums

log = logging.getLogger(__name__)

Placement = Literal["auto", "device", "host"]


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
    a: object  # parent A's tensor, flat, in its own dtype (mapped file, or on the device)
    b: object
    dot: float | None = None


class InPlaceMerger:
    """Holds parents A (λ = 0, the base) and B (λ = 1) and writes θ(λ) into `.model` in place.

    `method` is "slerp" or "linear"; `device` any torch device; `dtype` is the live model's
    (default float32 on CPU, bfloat16 on CUDA); arithmetic is float32 (float64 if a parent or
    the live model is float64) whatever the storage dtypes. `parents` (CUDA only): "auto"
    keeps them on the device when they fit with a margin, "device" or "host" force it.
    """

    def __init__(
        self,
        parent_a: str | os.PathLike[str],
        parent_b: str | os.PathLike[str],
        *,
        method: Literal["slerp", "linear"] = "slerp",
        device="cpu",
        dtype=None,
        parents: Placement = "auto",
    ):
        import torch

        from common.merge.checks import check_architectures, check_tensors
        from common.merge.stream import CpuMixer, WorkBuffers, choose_placement, work_dtype
        from common.model_io import Checkpoint

        if method not in ("slerp", "linear"):
            raise FedmergeError(f"method: expected slerp or linear, got {method!r}")
        if parents not in ("auto", "device", "host"):
            raise FedmergeError(f"parents: expected auto, device or host, got {parents!r}")
        self.method = method
        self.device = torch.device(device)
        if dtype is None:
            dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.dtype = dtype
        self.parent_a, self.parent_b = Path(parent_a), Path(parent_b)
        ckpt_a, ckpt_b = Checkpoint(self.parent_a), Checkpoint(self.parent_b)
        self._ckpts = (ckpt_a, ckpt_b)
        check_architectures([ckpt_a, ckpt_b])
        plans = [tp for tp in check_tensors([ckpt_a, ckpt_b], keep_base_vocab=False)
                 if tp.is_float]

        self.model = _live_model(self.parent_a, dtype, self.device)
        params = dict(self.model.named_parameters())
        params.update(dict(self.model.named_buffers()))
        for tp in plans:
            if tp.name not in params:
                raise FedmergeError(
                    f"{self.parent_a}: tensor {tp.name} has no parameter in the loaded "
                    f"{type(self.model).__name__}"
                )

        parent_bytes = sum(c.tensors[tp.name].nbytes for c in self._ckpts for tp in plans)
        free = total = None
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        self.placement, self.placement_reason = choose_placement(
            parents, self.device.type, parent_bytes, free, total)
        log.info("InPlaceMerger parents: %s (%s)", self.placement, self.placement_reason)

        self._slots: list[_Slot] = []
        with torch.no_grad():
            for tp in plans:
                a = ckpt_a.get(tp.name).reshape(-1)
                b = ckpt_b.get(tp.name).reshape(-1)
                if self.placement == "device":
                    a, b = a.to(self.device), b.to(self.device)
                target = params[tp.name].data.view(-1)
                self._slots.append(_Slot(tp.name, group_of(tp.name), target, a, b))

        dtypes = {s.a.dtype for s in self._slots} | {s.b.dtype for s in self._slots}
        self._work_dtype = work_dtype(dtype, *dtypes)
        self._streamer = self._work = self._cpu = None
        self._chunk = 1 << 24
        direct = [s.a.dtype == s.b.dtype == s.target.dtype == self._work_dtype
                  for s in self._slots]
        if self.placement == "streamed":
            from common.merge.stream import HostToDevice

            self._streamer = HostToDevice(self.device)
            widest = max(torch.empty(0, dtype=d).element_size()
                         for d in (*dtypes, self._work_dtype))
            self._chunk = self._streamer.slot_bytes // widest
        elif self.device.type == "cpu":
            # Parents already in the compute dtype are read straight from the mapped files;
            # the others convert chunk by chunk on a few threads (`CpuMixer`).
            converted = [(i, s) for i, s in enumerate(self._slots) if not direct[i]]
            if converted:
                self._cpu = CpuMixer([(s.target, s.a, s.b) for _, s in converted],
                                     torch.get_num_threads(), self._work_dtype)
                self._cpu_index = [i for i, _ in converted]
        if self.placement != "mapped" and (self._streamer is not None or not all(direct)):
            self._work = WorkBuffers.allocate(self._chunk, self._work_dtype, self.device)
        self._direct = direct
        self._scan()
        self.lam: float | dict[str, float] | None = None

    @property
    def memory(self) -> dict[str, int | str]:
        """Bytes held, by kind: the live model, the parents (where `placement` says), the
        bounded work and staging buffers."""
        live = sum(s.target.numel() * s.target.element_size() for s in self._slots)
        parents = sum(t.numel() * t.element_size() for s in self._slots for t in (s.a, s.b))
        work = 0 if self._work is None else 2 * self._work.acc.nbytes
        if self._cpu is not None:
            work += self._cpu.nbytes
        staging = 0 if self._streamer is None else self._streamer.nbytes
        return {"live_bytes": live, "parent_bytes": parents, "work_bytes": work,
                "staging_bytes": staging, "placement": self.placement}

    def _pairs(self):
        """(slot, a, b) for every tensor, with a and b on the live model's device."""
        if self._streamer is None:
            for s in self._slots:
                yield s, None, s.a, s.b
            return
        from common.merge.stream import pieces

        chunks = pieces(((s.a, s.b) for s in self._slots), self._chunk)
        for piece, a, b in self._streamer.stream(chunks):
            yield self._slots[piece.slot], piece, a, b

    def _scan(self) -> None:
        """One pass over both parents: the SLERP sums of every tensor, and NaN/inf refused."""
        import torch

        sums: dict[str, list[float]] = {s.name: [0.0, 0.0, 0.0] for s in self._slots}
        with torch.no_grad():
            for s, _, a, b in self._pairs():
                acc = sums[s.name]
                for i, v in enumerate(slerp_sums(a, b)):
                    acc[i] += v
        for s in self._slots:
            dot, sa, sb = sums[s.name]
            for ckpt, sq in zip(self._ckpts, (sa, sb), strict=True):
                if not math.isfinite(sq):
                    t = ckpt.get(s.name)
                    kind = "NaN" if bool(torch.isnan(t).any()) else "inf"
                    raise FedmergeError(
                        f"{ckpt.tensors[s.name].file}: tensor {s.name} contains {kind}; "
                        "parents must be finite"
                    )
            s.dot = slerp_cosine(dot, sa, sb) if self.method == "slerp" else None

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

        from common.merge.methods.linear import weighted_sum
        from common.merge.stream import mix_chunk, mix_tensor

        coeffs = self.coefficients(lam)
        with torch.no_grad():
            if self._streamer is not None:
                for s, piece, a, b in self._pairs():
                    alpha, beta = coeffs[piece.slot]
                    mix_chunk(s.target[piece.start:piece.stop], a, b, alpha, beta, self._work)
            else:
                for s, direct, (alpha, beta) in zip(self._slots, self._direct, coeffs,
                                                   strict=True):
                    if direct:
                        weighted_sum([s.a, s.b], [alpha, beta], out=s.target)
                    elif self._cpu is None:
                        mix_tensor(s.target, s.a, s.b, alpha, beta, self._work, self._chunk)
                if self._cpu is not None:
                    self._cpu.run([coeffs[i] for i in self._cpu_index])
        self.lam = lam if isinstance(lam, float | int) else dict(lam)

    def close(self) -> None:
        if self._cpu is not None:
            self._cpu.close()
        for s in self._slots:
            s.a = s.b = None
        for c in self._ckpts:
            c.close()


def _live_model(path: Path, dtype, device):
    """Parent A's model in the live dtype, on `device`, in eval mode."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    if device.type == "cpu":
        return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    if is_accelerate_available():  # transformers loads straight to the device only through it
        return AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, device_map={"": device}).eval()
    # Without accelerate the model passes through host memory once, while opening.
    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device).eval()
