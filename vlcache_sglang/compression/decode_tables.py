"""Device-side kept lengths per (request row, layer): what the decode path reads to build tables.

After `VLCacheCompression` trims request row r, layer l attends row[0 : kept_lens[r, l]] (the
prefix and its compacted kept tokens) and row[prompt_lens[r] : seq_len] (decode tokens); SGLang's
`req_to_token` row itself is unchanged. Rows of untrimmed requests stay 0/0, which reads
row[0 : seq_len], SGLang's own table, so one batch may mix trimmed and untrimmed requests. The
tables themselves are built per decode step on the GPU (`kernels.kept_kv_indices`); this class only
keeps the two small length tensors, written once per trimmed request and cleared when it leaves.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from vlcache_sglang.compression.selection import CompressionPlan
from vlcache_sglang.kernels.kept_kv_indices import kept_kv_indices


class KeptLengthTable:
    def __init__(self, num_rows: int, num_layers: int, device: Union[str, torch.device]) -> None:
        """num_rows: SGLang's ReqToTokenPool size; num_layers: the model's decoder layers."""
        self.kept_lens = torch.zeros(num_rows, num_layers, dtype=torch.int32, device=device)
        self.prompt_lens = torch.zeros(num_rows, dtype=torch.int32, device=device)

    @property
    def num_layers(self) -> int:
        return self.kept_lens.shape[1]

    def set(self, row: int, plan: CompressionPlan) -> None:
        """Record a trimmed request's per-layer table lengths (one small host-to-device copy)."""
        if plan.table_lengths is None:
            raise NotImplementedError("the plan drops shared-prefix tokens, so its tables are not two ranges of "
                                      "the row; keep the whole prefix (VLCacheCompression does)")
        if plan.num_layers != self.num_layers:
            raise ValueError(f"plan has {plan.num_layers} layers, the table {self.num_layers}")
        self.kept_lens[row] = torch.tensor(plan.table_lengths, dtype=torch.int32)
        self.prompt_lens[row] = plan.prompt_len

    def clear(self, row: int) -> None:
        """The request left (finished or retracted): its row serves SGLang's own table again."""
        self.kept_lens[row] = 0
        self.prompt_lens[row] = 0

    def tables(self, req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
               kv_indptr: Optional[torch.Tensor] = None,
               kv_indices: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer's decode table of a batch: (kv_indptr [L, bs + 1], kv_indices [L, capacity])."""
        return kept_kv_indices(req_to_token, req_pool_indices, seq_lens, self.kept_lens, self.prompt_lens,
                               kv_indptr, kv_indices)
