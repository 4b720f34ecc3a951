"""Attention for a subset of a batch's extend tokens over each request's whole KV (FlashInfer).

The active tokens of a request are split into maximal contiguous runs. A run covering request
tokens [a, b] attends keys [0, b] (cached prefix, reused image KV, fresh tokens alike) under the
ordinary bottom-right causal mask: its query i sees keys <= a + i, i.e. pos(key) <= pos(query).
Each run is one "request" of FlashInfer's paged prefill with page size 1, so the plan is built once
per distinct token set (plan) and every layer that uses that set only runs it (run).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

_WORKSPACE_BYTES = 256 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Contiguous runs of active tokens, host side.

    req_rows:  [R] req_to_token row of each run's request
    run_start: [R] absolute token index where each run starts (within its request)
    run_len:   [R] tokens in each run
    """

    req_rows: torch.Tensor
    run_start: torch.Tensor
    run_len: torch.Tensor

    @property
    def kv_len(self) -> torch.Tensor:
        return self.run_start + self.run_len  # keys [0, run end]


def runs_of(active_abs: list[torch.Tensor], req_rows: list[int]) -> RunLayout:
    """Runs of each request's sorted active absolute token indices (CPU)."""
    rows, starts, lens = [], [], []
    for row, toks in zip(req_rows, active_abs):
        if toks.numel() == 0:
            continue
        breaks = torch.nonzero(toks[1:] != toks[:-1] + 1).flatten() + 1
        bounds = torch.cat([torch.tensor([0]), breaks, torch.tensor([toks.numel()])])
        starts.append(toks[bounds[:-1]])
        lens.append(bounds[1:] - bounds[:-1])
        rows.append(torch.full((bounds.numel() - 1,), row, dtype=torch.int64))
    if not rows:
        empty = torch.empty(0, dtype=torch.int64)
        return RunLayout(empty, empty, empty)
    return RunLayout(torch.cat(rows), torch.cat(starts), torch.cat(lens))


def kv_indices_for(runs: RunLayout, req_to_token: torch.Tensor) -> torch.Tensor:
    """[sum(kv_len)] slot ids: req_to_token[row, 0:kv_len] for each run, concatenated (device)."""
    device = req_to_token.device
    kv_len = runs.kv_len.to(device)
    rows = torch.repeat_interleave(runs.req_rows.to(device), kv_len)
    starts = torch.cumsum(kv_len, 0) - kv_len
    cols = torch.arange(int(runs.kv_len.sum()), device=device) - torch.repeat_interleave(starts, kv_len)
    return req_to_token[rows, cols].to(torch.int32)


class SelectiveAttention:
    """plan(): once per token set; run(): per layer. Wraps FlashInfer's paged prefill."""

    def __init__(self, device: torch.device) -> None:
        import flashinfer

        self._workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(self._workspace, "NHD", backend="fa2")
        self._planned_q: Optional[int] = None

    def plan(
        self,
        runs: RunLayout,
        req_to_token: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sm_scale: float,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
    ) -> None:
        device = req_to_token.device
        n_runs = runs.run_len.numel()
        qo_indptr = torch.zeros(n_runs + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.cumsum(runs.run_len, 0)
        kv_indptr = torch.zeros(n_runs + 1, dtype=torch.int32)
        kv_indptr[1:] = torch.cumsum(runs.kv_len, 0)
        self._wrapper.plan(
            qo_indptr.to(device),
            kv_indptr.to(device),
            kv_indices_for(runs, req_to_token),
            torch.ones(n_runs, dtype=torch.int32, device=device),
            num_qo_heads,
            num_kv_heads,
            head_dim,
            1,
            causal=True,
            sm_scale=sm_scale,
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
        )
        self._planned_q = int(qo_indptr[-1])

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q: [n_active, heads, head_dim]; k/v_cache: the layer's pool buffers [slots, kv_heads, d]."""
        if self._planned_q != q.shape[0]:
            raise RuntimeError(f"planned for {self._planned_q} query tokens, got {q.shape[0]}")
        return self._wrapper.run(q, (k_cache, v_cache))
