"""Rotary parameters of a loaded model, in the form the copy-and-rotate kernel takes."""

from __future__ import annotations

from typing import Any

import torch


def inv_freq_of(rotary_emb: Any) -> torch.Tensor:
    """[rotary_dim / 2] float32 inverse frequencies of an SGLang RotaryEmbedding (MRotaryEmbedding too).

    Computed by the embedding's own `_compute_inv_freq`, so the kernel rotates with exactly the
    frequencies the model applied. Only neox-style embeddings without a scaling variant are
    accepted: for those, rotating by δ composes with the stored rotation exactly.
    """
    if not getattr(rotary_emb, "is_neox_style", False):
        raise NotImplementedError(f"{type(rotary_emb).__name__} is not neox-style; only neox rotation is supported")
    if getattr(rotary_emb, "mrope_interleaved", False):
        raise NotImplementedError("interleaved M-RoPE (Qwen3-VL style) is not supported; Qwen2.5-VL uses sections")
    return rotary_emb._compute_inv_freq(rotary_emb.base).to(torch.float32).cpu()


def language_rotary_embedding(model: Any) -> Any:
    """The rotary embedding of SGLang's Qwen2.5-VL language model (shared by all layers)."""
    return model.model.layers[0].self_attn.rotary_emb
