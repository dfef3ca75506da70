"""Run the final decoder layer for the last position only.

P(yes) needs the final hidden state of one position per prompt, yet a plain forward runs every
layer on every position. The last layer's output at earlier positions feeds nothing: only its
keys and values (which the last query attends to) are needed there. So, for decoder layers
whose computation is known exactly (the Llama layout), the scorer swaps in a forward that
projects keys/values for all positions but queries, attention output, MLP and norms for the last
one: about (L-1)/L of one layer's work saved per prompt. Other architectures keep the stock
forward; the numbers are the same either way (tests compare them).
"""

from __future__ import annotations

import sys
from contextlib import contextmanager

# Layer classes whose forward is exactly: x + attn(norm(x)); then h + mlp(norm(h)), with
# attention = RoPE(q/k/v projections) -> attention interface -> o_proj.
_KNOWN = {"LlamaDecoderLayer", "MistralDecoderLayer"}


def _supported(layer) -> bool:
    attn = getattr(layer, "self_attn", None)
    config = getattr(attn, "config", None)
    if type(layer).__name__ not in _KNOWN or attn is None or config is None:
        return False
    if getattr(config, "sliding_window", None) is not None:
        return False
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling", "layer_idx")
    parts = ("input_layernorm", "post_attention_layernorm", "mlp")
    return all(hasattr(attn, n) for n in names) and all(hasattr(layer, p) for p in parts)


def _last_position_forward(layer, stock_forward):
    import torch
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    module = sys.modules[type(layer).__module__]
    rope = module.apply_rotary_pos_emb
    eager = module.eager_attention_forward
    attn = layer.self_attn

    def forward(hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                use_cache=False, position_embeddings=None, **kwargs):
        mask_ok = attention_mask is None or (
            isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
        )
        if position_embeddings is None or not mask_ok or attn.training:
            return stock_forward(hidden_states, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=past_key_values,
                                 use_cache=use_cache, position_embeddings=position_embeddings,
                                 **kwargs)
        rows, length, _ = hidden_states.shape
        x = layer.input_layernorm(hidden_states)
        heads = (rows, length, -1, attn.head_dim)
        k = attn.k_proj(x).view(heads).transpose(1, 2)
        v = attn.v_proj(x).view(heads).transpose(1, 2)
        q = attn.q_proj(x[:, -1:]).view(rows, 1, -1, attn.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        q, _ = rope(q, q, cos[:, -1:], sin[:, -1:])
        _, k = rope(k, k, cos, sin)
        if past_key_values is not None:
            k, v = past_key_values.update(k, v, attn.layer_idx)
        mask = None if attention_mask is None else attention_mask[:, :, -1:, :]
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)
        out, _ = interface(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling, **kwargs)
        h = hidden_states[:, -1:] + attn.o_proj(out.reshape(rows, 1, -1).contiguous())
        return h + layer.mlp(layer.post_attention_layernorm(h))

    return forward


@contextmanager
def last_position_only(body, enabled: bool = True):
    """Within the block, `body`'s last layer returns only the last position (when supported).

    The body's `last_hidden_state` then has length 1; `[:, -1]` reads the same vector.
    """
    layers = getattr(body, "layers", None)
    layer = layers[-1] if enabled and layers is not None and len(layers) else None
    if layer is None or not _supported(layer) or "forward" in vars(layer):
        yield False
        return
    layer.forward = _last_position_forward(layer, layer.forward)
    try:
        yield True
    finally:
        del layer.forward
