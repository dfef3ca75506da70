"""Two Llama parents of real size with random weights, for the memory benchmarks.

TinyLlama's shape (1.1 B parameters: hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 kv
heads, vocab 32000) in bf16 safetensors, sharded like a released checkpoint. Tensors are drawn
and written one at a time into shards whose headers are planned first, so generating 2.2 GB
per parent needs the largest tensor in memory, not the model. A directory that is complete
(a marker written last) is reused, so reruns skip generation.

`scale` < 1 keeps every tensor's shape but takes fewer layers and a smaller vocabulary
(≈ scale × 1.1 B parameters), for developing the benchmark on a busy machine.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000)
LLAMA_7B = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)
SHARD_BYTES = 10**9
MARKER = ".complete"


def llama_config(scale: float = 1.0, shape: dict | None = None) -> dict:
    """config.json of the scaled shape (bf16, untied embeddings, as TinyLlama)."""
    base = dict(shape or TINYLLAMA)
    base["num_hidden_layers"] = max(1, round(base["num_hidden_layers"] * scale))
    base["vocab_size"] = max(256, round(base["vocab_size"] * scale / 64) * 64)
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "dtype": "bfloat16",
        "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.02, **base,
    }


def llama_tensors(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of a LlamaForCausalLM's state dict, in the order HF writes them."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head
    out = [("model.embed_tokens.weight", (v, h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def parameter_count(cfg: dict) -> int:
    return sum(math.prod(s) for _, s in llama_tensors(cfg))


def build_parent(out: Path, cfg: dict, seed: int, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write one random bf16 parent to `out` (reused when already complete)."""
    import torch

    from common.model_io import (
        INDEX_NAME,
        PlannedTensor,
        plan_shards,
        shard_names,
        write_safetensors_stream,
    )

    if (out / MARKER).exists() and json.loads((out / "config.json").read_text()) == cfg:
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.safetensors"):
        old.unlink()
    (out / MARKER).unlink(missing_ok=True)
    gen = torch.Generator().manual_seed(seed)
    planned = [PlannedTensor(n, s, "BF16") for n, s in llama_tensors(cfg)]
    shards = plan_shards(planned, shard_bytes)
    names = shard_names(len(shards))

    def draw(shard):
        for t in shard:
            if len(t.shape) == 1:  # norms near 1, as trained models have them
                x = 1.0 + 0.05 * torch.randn(t.shape, generator=gen)
            else:
                x = torch.randn(t.shape, generator=gen).mul_(0.02)
            yield x.to(torch.bfloat16)

    for fname, shard in zip(names, shards, strict=True):
        write_safetensors_stream(out / fname, shard, draw(shard), {"format": "pt"})
    if len(names) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in planned)},
                 "weight_map": {t.name: f for f, s in zip(names, shards, strict=True)
                                for t in s}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=1))
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / MARKER).write_text("")
    return out


def build_pair(root: Path, scale: float = 1.0, shape: dict | None = None) -> tuple[Path, Path]:
    cfg = llama_config(scale, shape)
    return build_parent(root / "parent_a", cfg, seed=1), build_parent(root / "parent_b", cfg,
                                                                      seed=2)
