"""Batched window attention for the vision tower in training.

transformers' Qwen2.5-VL vision attention runs one SDPA call per window unless a flash-attention
implementation is configured; with 64 images of 9 windows that is ~600 small launches per block.
Our images all have the same size, so every window of a block has the same length: we register an
attention function (its name contains "flash" so the tower hands it the whole varlen batch with
cu_seqlens) that reshapes equal windows into one batched SDPA call, and falls back to a loop
otherwise. Same arithmetic as the default path (tested); weights and checkpoints are unaffected.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

NAME = "flash_windows_sdpa"


def windowed_sdpa(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None = None, scaling: float | None = None,
                  dropout: float = 0.0, cu_seq_lens_q: torch.Tensor | None = None,
                  **kwargs) -> tuple[torch.Tensor, None]:
    """query/key/value: [1, heads, tokens, head_dim] with windows given by cu_seq_lens_q
    ([windows + 1], starts at 0). Returns [1, tokens, heads, head_dim] like the flash path."""
    if cu_seq_lens_q is None:
        raise ValueError(f"{NAME} needs cu_seq_lens_q (it serves the vision tower only)")
    lengths = torch.diff(cu_seq_lens_q).tolist()
    _, heads, tokens, dim = query.shape
    if len(set(lengths)) == 1:
        n, length = len(lengths), lengths[0]
        q, k, v = (t[0].reshape(heads, n, length, dim).transpose(0, 1) for t in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, scale=scaling)      # [n, heads, L, dim]
        out = out.transpose(1, 2).reshape(tokens, heads, dim)
    else:
        parts = [F.scaled_dot_product_attention(q, k, v, scale=scaling)
                 for q, k, v in zip(*(t.split(lengths, dim=2) for t in (query, key, value)))]
        out = torch.cat(parts, dim=2)[0].transpose(0, 1)                 # [tokens, heads, dim]
    return out.unsqueeze(0), None


def use_windowed_sdpa(model: torch.nn.Module) -> None:
    """Route the model's vision attention through `windowed_sdpa` (text attention is untouched)."""
    AttentionInterface.register(NAME, windowed_sdpa)
    model.model.visual.config._attn_implementation = NAME
