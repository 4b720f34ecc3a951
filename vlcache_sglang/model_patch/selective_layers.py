"""Qwen2 decoder layers over a subset of a batch's extend tokens (the active tokens).

The same ops in the same order as `Qwen2DecoderLayer.forward`, with attention replaced by any
object that has `run(q, k_cache, v_cache)` over the request's whole KV (SelectiveAttention eagerly,
a fixed-capacity ScatteredAttention inside a CUDA graph). Shared by the eager loop and its graphs.
"""

from __future__ import annotations

from typing import Any, Optional

import torch


def layer_qkv(layer: Any, positions: torch.Tensor, hidden: torch.Tensor,
              residual: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Input norm, QKV projection and M-RoPE for the active tokens: (q, k, v, residual), k after RoPE.

    The first half of a layer: an observing policy looks at k/v here, before anything is written."""
    if residual is None:
        residual = hidden
        hidden = layer.input_layernorm(hidden)
    else:
        hidden, residual = layer.input_layernorm(hidden, residual)
    attn = layer.self_attn
    qkv, _ = attn.qkv_proj(hidden)
    q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
    q, k = attn.rotary_emb(positions, q, k)  # the M-RoPE kernel rotates q/k in place, reads positions only
    return q, k, v, residual


def layer_attend(layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, residual: torch.Tensor,
                 out_loc: torch.Tensor, pool: Any, attention: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The second half: write K/V into slots `out_loc`, attend over the request's KV, o_proj, MLP."""
    attn = layer.self_attn
    radix = attn.attn
    k = k.reshape(-1, radix.tp_k_head_num, radix.qk_head_dim)
    v = v.reshape(-1, radix.tp_v_head_num, radix.v_head_dim)
    pool.set_kv_buffer(radix, out_loc, k, v)
    k_cache, v_cache = pool.get_kv_buffer(radix.layer_id)
    o = attention.run(q.reshape(-1, radix.tp_q_head_num, radix.head_dim), k_cache, v_cache)
    hidden, _ = attn.o_proj(o.reshape(-1, radix.tp_q_head_num * radix.head_dim))
    hidden, residual = layer.post_attention_layernorm(hidden, residual)
    hidden = layer.mlp(hidden)
    return hidden, residual


def selective_layer(layer: Any, positions: torch.Tensor, hidden: torch.Tensor, residual: Optional[torch.Tensor],
                    out_loc: torch.Tensor, pool: Any, attention: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer for the active tokens; writes their K/V into their slots `out_loc`."""
    q, k, v, residual = layer_qkv(layer, positions, hidden, residual)
    return layer_attend(layer, q, k, v, residual, out_loc, pool, attention)


def all_layers(lm: Any, positions: torch.Tensor, hidden: torch.Tensor, layer_out_loc: torch.Tensor, pool: Any,
               attention: Any) -> torch.Tensor:
    """Every layer of `lm` on one token set, then the final norm (what a CUDA graph captures).
    layer_out_loc [L, n]: where layer l writes each token's K/V; a token that layer l does not
    recompute writes slot 0 (SGLang's slot for padded writes), so its cached K/V stays in place."""
    return layer_range(lm, lm.start_layer, lm.end_layer, positions, hidden, None, layer_out_loc, pool, attention)


def layer_range(lm: Any, lo: int, hi: int, positions: torch.Tensor, hidden: torch.Tensor,
                residual: Optional[torch.Tensor], layer_out_loc: torch.Tensor, pool: Any,
                attention: Any) -> torch.Tensor:
    """Layers [lo, hi) of `lm` on one token set (layer_out_loc [hi - lo, n]); residual None at the
    first layer. Ending at the last layer: the final norm's output [n, H]; else the next layer's
    inputs stacked, [2, n, H] (hidden, residual): one tensor, what a captured graph returns."""
    for i, layer_id in enumerate(range(lo, hi)):
        hidden, residual = selective_layer(lm.layers[layer_id], positions, hidden, residual, layer_out_loc[i],
                                           pool, attention)
    if hi == lm.end_layer:
        return lm.norm(hidden, residual)[0]
    return torch.stack([hidden, residual])
