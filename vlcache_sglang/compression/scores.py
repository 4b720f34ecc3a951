"""Per-layer token scores s_l(j) and sparsity gamma_l of one request, from its post-vision queries.

Modality-aware scoring (VL-Cache): only the queries after the last image vote, because the
question text is what the answer will attend from; image tokens attending to image tokens say
little about what decode needs. Per layer l, with A'_l = softmax(Q_post K^T / sqrt(d)) causal:

    s_l(j)  = sum over heads h and post-vision queries i of A'_l[h, i, j]        (j < m)
    gamma_l = mean over (h, i) of the share of row (h, i)'s visible entries below 1 % of its max

Both come from the two-pass kernel `kernels/attention_scores.py` (no tau x m matrix beyond a tile).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from vlcache_sglang.compression.budget import SPARSITY_THRESHOLD, layers_sparsity
from vlcache_sglang.kernels.attention_scores import post_vision_scores

# Signature of post_vision_scores (and of its torch reference, which tests pass instead).
Scorer = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class LayerScores:
    token_scores: torch.Tensor  # [m] float32, s_l(j)
    sparse_counts: torch.Tensor  # [tau, num_qo_heads] int32
    sparsity: float  # gamma_l


def post_vision_positions(num_prompt_tokens: int, image_offsets: Sequence[tuple[int, int]],
                          fallback_queries: int = 32, max_queries: Optional[int] = None) -> torch.Tensor:
    """Positions [tau] int64 of the queries that vote: the prompt tokens after the last image.

    image_offsets: (start, end) per image, end inclusive (SGLang's `MultimodalDataItem.offsets`).
    Without an image, or with no text after the last one, the last `fallback_queries` tokens vote
    (at least the last prompt token, whose query produced the first output token). max_queries caps
    tau at the last max_queries tokens: the scoring pass costs tau x m per layer.
    """
    if num_prompt_tokens <= 0:
        raise ValueError(f"num_prompt_tokens must be > 0, got {num_prompt_tokens}")
    if fallback_queries < 1 or (max_queries is not None and max_queries < 1):
        raise ValueError(f"fallback_queries and max_queries must be >= 1, got {fallback_queries}, {max_queries}")
    ends = [end for _, end in image_offsets]
    if any(end >= num_prompt_tokens for end in ends):
        raise ValueError(f"image offsets {list(image_offsets)} reach past the prompt ({num_prompt_tokens} tokens)")
    start = max(ends) + 1 if ends else num_prompt_tokens
    if start >= num_prompt_tokens:
        start = max(0, num_prompt_tokens - fallback_queries)
    if max_queries is not None:
        start = max(start, num_prompt_tokens - max_queries)
    return torch.arange(start, num_prompt_tokens, dtype=torch.int64)


def score_layer(q_post: torch.Tensor, k_cache: torch.Tensor, req_to_token: torch.Tensor, req_row: int,
                q_positions: torch.Tensor, num_prompt_tokens: int, sm_scale: float,
                threshold: float = SPARSITY_THRESHOLD, scorer: Scorer = post_vision_scores) -> LayerScores:
    """s_l and gamma_l of one layer. Shapes as `kernels.attention_scores.post_vision_scores`:
    q_post [tau, num_qo_heads, head_dim] (after RoPE), k_cache [slots, num_kv_heads, head_dim]."""
    return score_request([q_post], [k_cache], req_to_token, req_row, q_positions, num_prompt_tokens, sm_scale,
                         threshold, scorer)[0]


def score_request(q_post_layers: Sequence[torch.Tensor], k_buffers: Sequence[torch.Tensor],
                  req_to_token: torch.Tensor, req_row: int, q_positions: torch.Tensor, num_prompt_tokens: int,
                  sm_scale: float, threshold: float = SPARSITY_THRESHOLD,
                  scorer: Scorer = post_vision_scores) -> list[LayerScores]:
    """s_l and gamma_l for every layer l: q_post_layers[l] against k_buffers[l] (SGLang's `k_buffer`).

    The kernels of all layers are launched before any result is read back: one synchronisation
    per request (the gammas), not one per layer.
    """
    if len(q_post_layers) != len(k_buffers):
        raise ValueError(f"one post-vision query tensor per layer: got {len(q_post_layers)} for "
                         f"{len(k_buffers)} layers")
    results = [scorer(q, k, req_to_token, req_row, q_positions, num_prompt_tokens, sm_scale, threshold=threshold)
               for q, k in zip(q_post_layers, k_buffers)]
    gammas = layers_sparsity([sparse for _, sparse in results], q_positions)
    return [LayerScores(scores, sparse, gamma) for (scores, sparse), gamma in zip(results, gammas)]
