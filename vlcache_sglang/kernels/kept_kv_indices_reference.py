"""Torch reference of the per-layer decode tables over kept prompt tokens."""

from __future__ import annotations

import torch


def kept_kv_indices_reference(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                              kept_lens: torch.Tensor, prompt_lens: torch.Tensor) -> list[list[torch.Tensor]]:
    """tables[l][b] = row[0 : kept_lens[r, l]] ++ row[prompt_lens[r] : seq_lens[b]], r = req_pool_indices[b],
    row = req_to_token[r]; int32. An untrimmed request has kept_lens[r] = 0 and prompt_lens[r] = 0."""
    tables = []
    for layer in range(kept_lens.shape[1]):
        per_req = []
        for b, r in enumerate(req_pool_indices.tolist()):
            row = req_to_token[r]
            kept, prompt, seq = int(kept_lens[r, layer]), int(prompt_lens[r]), int(seq_lens[b])
            per_req.append(torch.cat([row[:kept], row[prompt:seq]]).to(torch.int32))
        tables.append(per_req)
    return tables
