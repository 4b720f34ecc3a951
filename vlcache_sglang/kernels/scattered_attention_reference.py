"""Torch reference of the scattered-query attention kernel: gather each request's keys, masked softmax."""

from __future__ import annotations

import torch

_QUERY_CHUNK = 256  # queries per score matrix: bounds memory for long requests


def scattered_attention_reference(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    q_req_rows: torch.Tensor,
    q_positions: torch.Tensor,
    sm_scale: float,
) -> torch.Tensor:
    """softmax(q_t K^T * sm_scale) V over keys j in [0, q_positions[t]] of request q_req_rows[t].

    q:            [n, num_qo_heads, head_dim]
    k/v_cache:    [slots, num_kv_heads, head_dim]; query head h reads KV head h // (qo / kv heads)
    req_to_token: [rows, max_context] slot of each request position
    q_req_rows, q_positions: [n]
    Computes in float32 and returns q's dtype, [n, num_qo_heads, head_dim].
    """
    out = torch.empty_like(q)
    group = q.shape[1] // k_cache.shape[1]
    rows = q_req_rows.to(q.device)
    pos = q_positions.to(device=q.device, dtype=torch.int64)
    for row in torch.unique(rows).tolist():
        which = torch.nonzero(rows == row).flatten()
        kv_len = int(pos[which].max()) + 1
        slots = req_to_token[row, :kv_len].to(torch.int64)
        k = k_cache[slots].float().repeat_interleave(group, dim=1)  # [kv_len, qo_heads, d]
        v = v_cache[slots].float().repeat_interleave(group, dim=1)
        for chunk in torch.split(which, _QUERY_CHUNK):
            scores = torch.einsum("qhd,khd->hqk", q[chunk].float(), k) * sm_scale
            visible = torch.arange(kv_len, device=q.device)[None, :] <= pos[chunk][:, None]  # [q, k]
            scores = scores.masked_fill(~visible[None], float("-inf"))
            out[chunk] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)
    return out
