"""Torch reference of the post-vision attention-score kernel: gather the request's keys, softmax, sum."""

from __future__ import annotations

import torch

_QUERY_CHUNK = 64  # queries per score matrix: bounds memory for long prompts


def post_vision_scores_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_row: int,
    q_positions: torch.Tensor,
    num_keys: int,
    sm_scale: float,
    threshold: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores and sparse counts of A' = softmax(q K^T * sm_scale), causal by position.

    q:            [tau, num_qo_heads, head_dim]; query head h reads KV head h // (qo / kv heads)
    k_cache:      [slots, num_kv_heads, head_dim]
    req_to_token: [rows, max_context]; keys j in [0, num_keys) live at slots req_to_token[req_row, j]
    q_positions:  [tau], query i sees keys j <= q_positions[i] (< num_keys)
    Returns (scores [num_keys] float32: sum over queries and heads of A'[h, i, j];
             sparse [tau, num_qo_heads] int32: visible entries of row (i, h) below threshold x its max).
    """
    tau, heads, _ = q.shape
    group = heads // k_cache.shape[1]
    slots = req_to_token[req_row, :num_keys].to(torch.int64)
    k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [m, qo_heads, d]
    pos = q_positions.to(device=q.device, dtype=torch.int64)
    scores = torch.zeros(num_keys, dtype=torch.float32, device=q.device)
    sparse = torch.zeros(tau, heads, dtype=torch.int32, device=q.device)
    for chunk in torch.split(torch.arange(tau, device=q.device), _QUERY_CHUNK):
        logits = torch.einsum("qhd,khd->hqk", q[chunk].float(), k) * sm_scale
        visible = torch.arange(num_keys, device=q.device)[None, :] <= pos[chunk][:, None]  # [q, k]
        probs = logits.masked_fill(~visible[None], float("-inf")).softmax(-1)  # [h, q, k]
        scores += probs.sum((0, 1))
        below = (probs < threshold * probs.amax(-1, keepdim=True)) & visible[None]
        sparse[chunk] = below.sum(-1).T.to(torch.int32)
    return scores, sparse
