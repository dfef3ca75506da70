"""Writing a merge as a Hugging Face model directory that loads offline.

Output is assembled in a temporary sibling directory and renamed into place only when complete,
so an error (or Ctrl-C) never leaves a half-written model that looks usable. Tensors are merged
one at a time and streamed into shards whose headers are planned up front, so memory stays at a
few tensors whatever the model size. The model card is written from local facts only (no
network: mergekit's card step crashed offline after the weights were written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from common.errors import FedmergeError
from common.merge.checks import MergePlan, TensorPlan, prepare_merge
from common.merge.config import MergeConfig
from common.model_io import (
    DTYPES,
    INDEX_NAME,
    PlannedTensor,
    fingerprint,
    plan_shards,
    shard_names,
    tokenizer_files,
    write_safetensors_stream,
)

DEFAULT_SHARD_SIZE = "5GB"
RECIPE_NAME = "mergekit_config.yml"
CARD_NAME = "README.md"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """Bytes from `123`, `"500MB"`, `"2GB"`, `"512MiB"` (decimal and binary units)."""
    if isinstance(text, int):
        value = text
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise FedmergeError(
                f"--shard-size: expected bytes or a size like 500MB, 2GB, 512MiB; got {text!r}"
            )
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise FedmergeError(f"--shard-size: expected a positive size, got {text!r}")
    return value


def merged_tensors(plan: MergePlan, names: list[str], seed: int) -> Iterator:
    """Yield the merged tensors `names`, in order, each computed from memory-mapped parents."""
    import torch

    from common.merge.job import TensorJob
    from common.merge.methods import merge_function

    fn = merge_function(plan.config.merge_method)
    by_name = {tp.name: tp for tp in plan.tensors}
    donor = plan.checkpoints[plan.donor]
    for name in names:
        tp: TensorPlan = by_name[name]
        out_dtype = getattr(torch, DTYPES[plan.out_dtype_by_name[name]][0])
        if not tp.is_float:
            yield donor.get(name)
            continue
        raw = {m: plan.checkpoints[m].get(name) for m in plan.checkpoints}
        compute = torch.float64 if any(t.dtype == torch.float64 for t in raw.values()) else (
            torch.float32)
        base_src = raw[plan.base] if plan.base is not None else None
        loaded = {}
        for m, t in raw.items():
            t = t.to(compute)
            if tp.vocab_rows is not None:
                t = _fit_rows(t, base_src.to(compute), tp.vocab_rows)
            loaded[m] = t
        job = TensorJob(
            name=name,
            base=loaded[plan.base] if plan.base is not None else None,
            tensors=[loaded[m] for m in plan.contributors],
            model_params=[plan.resolver.model_params(m, name) for m in plan.contributors],
            params=plan.resolver.global_params(name),
            seed=seed,
        )
        out = fn(job)
        yield out.to(out_dtype)


def _fit_rows(t, base, rows: int):
    """Keep the base vocabulary: cut extra rows, and fill missing ones with the base's rows
    (a parent that lacks a token then contributes the base's embedding for it)."""
    import torch

    if t.shape[0] >= rows:
        return t[:rows]
    return torch.cat([t, base[t.shape[0]:rows]], dim=0)


def _model_card(plan: MergePlan, seed: int, recipe_yaml: str) -> str:
    roles = []
    for path in plan.checkpoints:
        role = "base" if path == plan.base else "model"
        if path == plan.donor:
            role += ", config and tokenizer donor"
        roles.append(f"| `{path}` | {role} | `{fingerprint(path)}` |")
    params = json.dumps(plan.config.to_dict().get("parameters", {}))
    return "\n".join([
        "---",
        "library_name: transformers",
        "tags:",
        "- merge",
        "- fedmerge",
        "---",
        "# Merged model",
        "",
        f"Produced by `fedmerge merge` with method **{plan.config.merge_method}**"
        f" (mergekit 0.1.5 semantics), random seed {seed}.",
        "",
        "## Parents",
        "",
        "| model | role | SHA-256 (config.json and weights) |",
        "|---|---|---|",
        *roles,
        "",
        "## Parameters",
        "",
        f"Global: `{params}`",
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe_yaml.rstrip(),
        "```",
        "",
    ])


def write_merge(
    config: MergeConfig,
    out_dir: str | Path,
    *,
    shard_size: int | str = DEFAULT_SHARD_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """Validate, merge and write `config` to `out_dir` (which must not exist); return the path."""
    out_dir = Path(out_dir)
    shard_bytes = parse_size(shard_size)
    if out_dir.exists():
        raise FedmergeError(f"{out_dir}: output directory already exists; choose a new path")
    if not out_dir.parent.is_dir():
        raise FedmergeError(f"{out_dir.parent}: missing parent directory for the output")
    with _progress(progress) as bar:
        task = bar.add_task("checking parents", total=None)
        plan = prepare_merge(config, progress=lambda: bar.advance(task))
        try:
            planned = [PlannedTensor(tp.name, tp.shape, plan.out_dtype_by_name[tp.name])
                       for tp in plan.tensors]
            shards = plan_shards(planned, shard_bytes)
            names = shard_names(len(shards))
            tmp = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            try:
                bar.update(task, description="merging", total=len(planned), completed=0)
                for fname, shard in zip(names, shards, strict=True):
                    tensors = _advancing(
                        merged_tensors(plan, [t.name for t in shard], seed),
                        lambda: bar.advance(task),
                    )
                    write_safetensors_stream(tmp / fname, shard, tensors, {"format": "pt"})
                _write_metadata(plan, tmp, names, shards, seed)
                os.rename(tmp, out_dir)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        finally:
            plan.close()
    return out_dir


def _advancing(it, step):
    for item in it:
        yield item
        step()


def _write_metadata(plan: MergePlan, tmp: Path, names, shards, seed: int) -> None:
    total = sum(t.nbytes for shard in shards for t in shard)
    if len(names) > 1:
        index = {
            "metadata": {"total_size": total},
            "weight_map": {t.name: fname for fname, shard in zip(names, shards, strict=True)
                           for t in shard},
        }
        (tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    donor = plan.checkpoints[plan.donor]
    cfg = dict(donor.config)
    if plan.config.dtype:
        cfg["dtype"] = plan.config.dtype
        if "torch_dtype" in cfg:
            cfg["torch_dtype"] = plan.config.dtype
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for f in tokenizer_files(donor.path):
        shutil.copyfile(f, tmp / f.name)
    recipe = plan.config.to_yaml()
    (tmp / RECIPE_NAME).write_text(recipe)
    (tmp / CARD_NAME).write_text(_model_card(plan, seed, recipe))


class _NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def add_task(self, *a, **k):
        return 0

    def advance(self, *a, **k):
        pass

    def update(self, *a, **k):
        pass


def _progress(enabled: bool):
    if not enabled:
        return _NoProgress()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    transient=True)
