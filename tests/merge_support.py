"""Helpers for the merge tests: checkpoint surgery, and reference formulas in float64 numpy.

The references are written from the formulas in ../shared/notes/merging.md and share no code
with common/merge, so a wrong engine cannot agree with them by construction. Parents are read
with safetensors' numpy loader, not with fedmerge's reader.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np


def load_np(model_dir: Path) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint as float64 numpy arrays (single file or shards)."""
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update({k: v.astype(np.float64) for k, v in load_file(str(f)).items()})
    return out


def load_written(model_dir: Path) -> dict[str, np.ndarray]:
    return load_np(model_dir)


def _copy_without_weights(src: Path, dst: Path) -> dict:
    """Copy checkpoint `src` to `dst` and take its weights out: the tensors of every shard
    (name -> torch tensor), with the shard files and their index removed from `dst`."""
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    tensors = {}
    for f in sorted(dst.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
        f.unlink()
    (dst / "model.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def rewrite(src: Path, dst: Path, fn) -> Path:
    """Copy checkpoint `src` to `dst`, passing its tensors (a name -> torch tensor dict, merged
    over shards) through `fn`, and write them back as one file."""
    from safetensors.torch import save_file

    tensors = fn(_copy_without_weights(src, dst))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    return dst


# A tensor and an element to poison with NaN or inf: both merge paths must refuse the parent.
POISONED = "model.layers.1.mlp.down_proj.weight"


def poisoned(src: Path, dst: Path, value: float) -> Path:
    """Checkpoint `src` copied to `dst` with one element of POISONED set to `value`."""

    def poison(ts):
        ts[POISONED][3, 5] = value
        return ts

    return rewrite(src, dst, poison)


def set_config(model_dir: Path, **fields) -> None:
    path = Path(model_dir) / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(fields)
    path.write_text(json.dumps(cfg))


def assert_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol=1e-6) -> None:
    assert set(got) == set(want), set(got) ^ set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        err = float(np.max(np.abs(got[k] - want[k]))) if want[k].size else 0.0
        assert err <= atol, f"{k}: max abs error {err}"


# ---- reference formulas -------------------------------------------------------------------

def ref_linear(xs: list[np.ndarray], ws: list[float], normalize=True) -> np.ndarray:
    acc = sum(w * x for w, x in zip(ws, xs, strict=True))
    return acc / sum(ws) if normalize else acc


def ref_slerp(a: np.ndarray, b: np.ndarray, t: float) -> np.ndarray:
    va, vb = a.ravel(), b.ravel()
    na, nb = np.linalg.norm(va), np.linalg.norm(vb)
    ua = va / na if na > 1e-8 else va
    ub = vb / nb if nb > 1e-8 else vb
    dot = float(np.clip(np.sum(ua * ub), -1.0, 1.0))
    if abs(dot) > 0.9995:
        return (1 - t) * a + t * b
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * a + np.sin(t * theta) * b) / np.sin(theta)


def ref_cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def ref_topk(delta: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return delta
    k = max(1, int(density * delta.size))
    flat = delta.ravel()
    keep = np.argsort(-np.abs(flat), kind="stable")[:k]
    out = np.zeros_like(flat)
    out[keep] = flat[keep]
    return out.reshape(delta.shape)


def ref_combine(base, deltas, ws, *, consensus, normalize, lam):
    weighted = [w * d for w, d in zip(ws, deltas, strict=True)]
    if consensus:
        majority = np.where(sum(weighted) >= 0, 1.0, -1.0)
        keeps = [np.sign(wd) == majority for wd in weighted]
        mixed = sum(np.where(k, wd, 0.0) for k, wd in zip(keeps, weighted, strict=True))
        divisor = sum(k * w for k, w in zip(keeps, ws, strict=True))
        divisor = np.where(divisor == 0, 1.0, divisor)
    else:
        mixed = sum(weighted)
        divisor = sum(ws) if abs(sum(ws)) >= 1e-8 else 1.0
    if normalize:
        mixed = mixed / divisor
    return base + lam * mixed


def ref_dare_delta(delta: np.ndarray, keep: np.ndarray, rescale: bool) -> np.ndarray:
    kept = np.where(keep, delta, 0.0)
    if rescale:
        before, after = np.abs(delta).sum(), np.abs(kept).sum()
        if before >= 1e-8 and after >= 1e-8:
            kept = kept * (before / after)
    return kept


_LAYER = re.compile(r"layers\.(\d+)\.")


def layer_index(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def load_np_torch(model_dir: Path) -> dict[str, np.ndarray]:
    """Like `load_np` for any dtype numpy lacks (bf16): read with safetensors' torch loader."""
    from safetensors.torch import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update({k: v.double().numpy() for k, v in load_file(str(f)).items()})
    return out


def write_sharded(src: Path, dst: Path, dtype, shards: int) -> Path:
    """Copy checkpoint `src` to `dst` with its float tensors cast to `dtype` (a torch dtype),
    spread over `shards` files with an index, as a released checkpoint is."""
    from safetensors.torch import save_file

    tensors = _copy_without_weights(src, dst)
    names = list(tensors)
    weight_map, total = {}, 0
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n].to(dtype).contiguous() if tensors[n].is_floating_point()
                else tensors[n] for n in names[i::shards]}
        save_file(part, str(dst / fname), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
        total += sum(t.numel() * t.element_size() for t in part.values())
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return dst
