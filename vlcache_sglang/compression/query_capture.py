"""Which Q rows a prefill batch must keep for the post-prefill step, and the rows kept layer by layer.

The step scores each layer's prompt keys against the post-vision queries (`scores.py`), i.e. Q
after RoPE at a few prompt positions, at every layer. SGLang computes Q inside each layer and drops
it; an AROUND hook on `RadixAttention.forward` (`install.py`) hands every layer's q to
`BatchCapture.take`, which keeps only the planned rows. Planned by the scheduler right after the
batch's slots are allocated (`CompressionRuntime.plan_batch`), from the host-side extend layout,
so the forward needs no synchronisation to find them.

Only the last chunk of a request's prefill is captured (its last prompt token always lies in it);
voting positions in earlier chunks are dropped. The selective prefill of reused images runs its own
attention, not RadixAttention's: it hands Q of its active tokens to `take_active` instead (the
voters are text after the last image, never reused, so always active). A capture left incomplete
serves its request uncompressed (`complete` is False, counted).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch


@dataclass(frozen=True)
class RequestCapture:
    """One request's share of a batch's captured rows."""

    req_pool_idx: int
    prompt_len: int  # m: the request's KV length once this (last) chunk is written
    positions: torch.Tensor  # [tau] int64 prompt positions, sorted, all inside the last chunk
    start: int  # its rows are BatchCapture.rows[start : start + tau]


@dataclass
class BatchCapture:
    """Rows of one extend batch's token axis whose Q every layer keeps; filled as the forward runs."""

    prefix_lens: list[int]  # the batch's extend layout, to recognise its forward
    extend_lens: list[int]
    requests: list[RequestCapture]
    rows: torch.Tensor  # [sum tau] int64 indices into the extend token axis (device)
    rows_cpu: torch.Tensor  # the same on the host (the selective prefill maps them without a sync)
    queries: dict[int, torch.Tensor] = field(default_factory=dict)  # layer id -> [sum tau, qo_heads, head_dim]
    sm_scale: Optional[float] = None

    def matches(self, forward_batch: Any) -> bool:
        """Whether `forward_batch` is the batch this capture was planned for (same extend layout)."""
        return (list(forward_batch.extend_prefix_lens_cpu or ()) == self.prefix_lens
                and list(forward_batch.extend_seq_lens_cpu or ()) == self.extend_lens)

    def take(self, layer_id: int, q: torch.Tensor, num_heads: int, head_dim: int, sm_scale: float) -> None:
        """Keep layer `layer_id`'s planned rows of q ([extend tokens, num_heads * head_dim], after RoPE)."""
        self.queries[layer_id] = q[self.rows].reshape(-1, num_heads, head_dim).clone()
        self.sm_scale = sm_scale

    def take_active(self, layer_id: int, active_rows_cpu: torch.Tensor, q: torch.Tensor, num_heads: int,
                    head_dim: int, sm_scale: float) -> bool:
        """As `take`, for a q of the active tokens only (the selective prefill: q [len(active_rows_cpu),
        ...], active_rows_cpu sorted extend-axis indices). False, keeping nothing, when a planned row is
        not active at this layer (the capture then stays incomplete and the request uncompressed)."""
        n = active_rows_cpu.numel()
        idx = torch.searchsorted(active_rows_cpu, self.rows_cpu)
        if n == 0 or bool((idx >= n).any()) or not torch.equal(active_rows_cpu[idx.clamp(max=n - 1)], self.rows_cpu):
            return False
        self.queries[layer_id] = q[idx.to(q.device)].reshape(-1, num_heads, head_dim).clone()
        self.sm_scale = sm_scale
        return True

    def complete(self, num_layers: int) -> bool:
        return all(layer in self.queries for layer in range(num_layers))

    def request_queries(self, request: RequestCapture, num_layers: int) -> list[torch.Tensor]:
        """L x [tau, qo_heads, head_dim]: the request's rows at every layer (complete captures only)."""
        end = request.start + request.positions.numel()
        return [self.queries[layer][request.start: end] for layer in range(num_layers)]


def plan_capture(prefix_lens: Sequence[int], extend_lens: Sequence[int],
                 wanted: Sequence[Optional[tuple[int, int, torch.Tensor]]],
                 device: torch.device | str) -> Optional[BatchCapture]:
    """The capture of one extend batch, or None when no request of it wants one.

    wanted[b]: (req_pool_idx, prompt_len m, positions [tau] int64) for request b of the batch when
    this chunk is its last and its step asked for those query positions; None otherwise.
    """
    if len(prefix_lens) != len(extend_lens) or len(wanted) != len(extend_lens):
        raise ValueError(f"one prefix length, extend length and wish per request: got {len(prefix_lens)}, "
                         f"{len(extend_lens)}, {len(wanted)}")
    requests, rows, offset, start = [], [], 0, 0
    for prefix, extend, wish in zip(prefix_lens, extend_lens, wanted):
        if wish is not None:
            req_pool_idx, m, positions = wish
            if prefix + extend != m:
                raise ValueError(f"request row {req_pool_idx}: capture planned for a chunk [{prefix}, "
                                 f"{prefix + extend}) that does not end the prompt (m = {m})")
            positions = positions[positions >= prefix].to(torch.int64)
            if positions.numel():
                requests.append(RequestCapture(req_pool_idx, m, positions, start))
                rows.append(offset + positions - prefix)
                start += positions.numel()
        offset += extend
    if not requests:
        return None
    rows_cpu = torch.cat(rows)
    return BatchCapture(list(prefix_lens), list(extend_lens), requests, rows_cpu.to(device), rows_cpu)
