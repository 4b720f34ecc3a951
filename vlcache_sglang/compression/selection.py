"""Which prompt tokens each layer keeps, and the slot tables and frees that follow from it.

Selection: layer l keeps its top-(kept_l - w) prompt tokens by s_l(j) plus the last w prompt tokens
(w = the post-vision queries and any recent window: they are what decode attends from most, and
the first output token's query is among them). Decode tokens are never candidates: they do not
exist yet when the step runs, and the decode path appends them to every layer's table.

Design: per-layer tables against SGLang's one `req_to_token` (REVIEW finding 10)
-------------------------------------------------------------------------------------------
SGLang maps request position -> KV slot in one `req_to_token[req, :]` row shared by all layers,
while each layer's K/V is its own buffer (`k_buffer[layer][slot]`). A slot index therefore names
L independent cells, and one layer's kept tokens can be *moved* into slots another layer's kept
tokens occupy. `plan_compaction` uses that:

* Positions [0, p) (p = `req.cache_protected_len`, the matched radix prefix) belong to the tree and
  may be shared with other requests: they are never moved, written or freed; a kept prefix token is
  attended in place at its own slot.
* The kept own tokens of layer l (positions >= p), n'_l of them in position order, are copied at
  layer l into the request's own slots row[p : p + n'_l] (k-th kept token -> row[p + k]; its source
  row[j] has j >= p + k, so one gather-then-scatter per layer is safe in place).
* row[p : p + N'] stay allocated (N' = max_l n'_l); row[p + N' : m] go back to the allocator at
  once. A slot is freed only if no layer needs it, and compaction makes that max_l n'_l rather
  than |union_l kept_l|: with per-layer top-k sets the union is far larger than the largest set.
  A layer with beta_l = 1 keeps m, so N' = m - p and nothing is freed: the memory win needs every
  budget below 1 (the clip at 1 is an open question for wiring).
* `kv_indices[l]` = kept prefix slots ++ row[p : p + n'_l]: the prompt part of layer l's decode
  table (order does not matter to decode attention: every prompt key precedes every decode query).
  The decode path appends the request's decode slots row[m : seq_len] for every layer.
* `VLCacheCompression` keeps the whole prefix at every layer (it cannot be freed anyway), so layer
  l's table is two contiguous ranges of the unchanged row, row[0 : p + n'_l] ++ row[m : seq_len]:
  one int per (request, layer) describes it (`plan.table_lengths`), and the decode tables are
  built on the GPU from req_to_token like SGLang's own (`kernels/kept_kv_indices.py`), CUDA-graph
  safe. Dropping prefix tokens too would need copies of them in own slots (an open question).

Positions stay the true ones: K is stored after RoPE, so moving a K row between slots does not
change its position, and `req.seq_len` keeps counting every prompt token (SGLang derives decode
positions, with the M-RoPE delta, from it). What changes is the attention length at layer l:
p_kept_l + n'_l + decoded, which the decode attention backend must take from this plan instead of
`seq_lens` (`kv_indptr` per layer) — the wiring step.

After compaction row[p + N' : m] name freed slots and row[p : p + N'] no longer hold position j's
KV at every layer: nothing may read the row as a position -> slot map for [p, m) again. Hence the
request is marked `kv_trimmed` (`step.mark_kv_trimmed`), and the cache must check it:
* never insert a trimmed request into the radix tree (its KV is not the prefix's KV), nor store its
  images in the image store (store them *before* the step, while the KV is whole, or not at all);
* on finish or retraction free exactly row[p : p + N'] and row[m : kv_len], never row[p + N' : m]
  (already freed: SGLang's own `cache_finished_req(is_insert=False)` would free them twice).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch


def select_kept_positions(scores: torch.Tensor, count: int, protected_tail: int,
                          protected_head: int = 0) -> torch.Tensor:
    """Sorted int64 positions [count] of the m prompt tokens one layer keeps.

    scores: [m] s_l(j); count: kept_l (clamped to [min(protected_head + protected_tail, m), m]); the
    first protected_head and the last protected_tail positions are always kept, the rest filled by
    the highest scores (ties: the earlier position). count >= m keeps everything.
    """
    if scores.dim() != 1:
        raise ValueError(f"scores must be 1-D [m], got {tuple(scores.shape)}")
    if count < 0 or protected_tail < 0 or protected_head < 0:
        raise ValueError(f"count, protected_tail and protected_head must be >= 0, got {count}, {protected_tail}, "
                         f"{protected_head}")
    m = scores.numel()
    if bool(torch.isnan(scores).any()):
        raise ValueError("scores hold NaN: a poisoned or unwritten KV slot was scored")
    tail = min(protected_tail, m)
    head = min(protected_head, m - tail)
    count = min(max(count, head + tail), m)
    if count == m:
        return torch.arange(m, dtype=torch.int64, device=scores.device)
    middle = scores[head: m - tail].float()
    # Stable descending sort: equal scores keep the earlier position (deterministic, unlike topk).
    top = head + torch.sort(middle, descending=True, stable=True).indices[: count - head - tail].to(torch.int64)
    fixed = torch.cat([torch.arange(head, dtype=torch.int64, device=scores.device),
                       torch.arange(m - tail, m, dtype=torch.int64, device=scores.device)])
    return torch.sort(torch.cat([top, fixed])).values


def select_layers(layer_scores: Sequence[torch.Tensor], counts: Sequence[int],
                  protected_tail: int, protected_head: int = 0) -> list[torch.Tensor]:
    """select_kept_positions for every layer: scores [m] and kept count per layer."""
    if len(layer_scores) != len(counts):
        raise ValueError(f"one count per layer: got {len(counts)} counts for {len(layer_scores)} layers")
    return [select_kept_positions(s, c, protected_tail, protected_head) for s, c in zip(layer_scores, counts)]


@dataclass(frozen=True)
class CompressionPlan:
    """One request's trimmed KV: what each layer attends, what moves, what is freed."""

    prompt_len: int  # m
    shared_prefix_len: int  # p: radix-prefix positions (tree slots: never moved or freed)
    kept_positions: list[torch.Tensor]  # per layer: sorted int64 prompt positions kept
    kv_indices: list[torch.Tensor]  # per layer: int64 slots of the prompt part of the decode table
    copies: list[tuple[torch.Tensor, torch.Tensor]]  # per layer: (src, dst) int64 slots, src != dst
    retained_len: int  # row[p : retained_len] stay the request's; the tail of the prompt is freed
    free_slots: torch.Tensor  # int64 row[retained_len : m], back to the allocator after the copies
    # When every layer keeps the whole prefix: layer l's table is row[0 : table_lengths[l]], one
    # contiguous range (decode: ++ row[m : seq_len]); None otherwise.
    table_lengths: Optional[list[int]] = None

    @property
    def kept_lengths(self) -> list[int]:
        return [int(k.numel()) for k in self.kv_indices]

    @property
    def num_layers(self) -> int:
        return len(self.kv_indices)

    def slots_to_free_on_finish(self, row: torch.Tensor, kv_len: int) -> torch.Tensor:
        """The request's slots to free when it finishes or is retracted: its retained prompt slots
        row[p : retained_len] and its decode slots row[m : kv_len]; never the prefix's (the tree's)
        nor row[retained_len : m] (freed when the plan was applied).

        row: the request's req_to_token row (at least kv_len wide); kv_len >= m, SGLang's
        `kv_len_to_handle` (committed KV length).
        """
        if kv_len < self.prompt_len or row.numel() < kv_len:
            raise ValueError(f"kv_len must lie in [m = {self.prompt_len}, {row.numel()}], got {kv_len}")
        row = row.to(torch.int64)
        return torch.cat([row[self.shared_prefix_len: self.retained_len], row[self.prompt_len: kv_len]])


def plan_compaction(row_slots: torch.Tensor, kept_positions: Sequence[torch.Tensor],
                    shared_prefix_len: int) -> CompressionPlan:
    """The plan for one request (see the module docstring).

    row_slots:      [m] slots of the prompt, `req_to_token[req_pool_idx, :m]`
    kept_positions: per layer, sorted unique int positions in [0, m) (`select_layers`)
    shared_prefix_len: p = `req.cache_protected_len`, 0 <= p <= m
    """
    m = row_slots.numel()
    if not 0 <= shared_prefix_len <= m:
        raise ValueError(f"shared_prefix_len must lie in [0, {m}], got {shared_prefix_len}")
    if not kept_positions:
        raise ValueError("need the kept positions of at least one layer")
    row = row_slots.to(torch.int64)
    p = shared_prefix_len
    kept_list, indices, copies = [], [], []
    for layer, kept in enumerate(kept_positions):
        kept = kept.to(device=row.device, dtype=torch.int64)
        if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= m or bool((kept[1:] <= kept[:-1]).any())):
            raise ValueError(f"layer {layer}: kept positions must be sorted, unique and in [0, {m})")
        prefix, own = kept[kept < p], kept[kept >= p]
        dst = row[p: p + own.numel()]
        src = row[own]
        moved = src != dst
        kept_list.append(kept)
        indices.append(torch.cat([row[prefix], dst]))
        copies.append((src[moved], dst[moved]))
    own_counts = [int((k >= p).sum()) for k in kept_list]
    retained = p + max(own_counts)
    whole_prefix = all(int((k < p).sum()) == p for k in kept_list)
    lengths = [p + n for n in own_counts] if whole_prefix else None
    return CompressionPlan(m, p, kept_list, indices, copies, retained, row[retained:m].clone(), lengths)


def apply_compaction(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor],
                     plan: CompressionPlan) -> None:
    """Move each layer's kept K/V into its compacted slots (torch; one gather + scatter per layer).

    k_buffers / v_buffers: L tensors [slots, kv_heads, head_dim] (SGLang's `k_buffer` / `v_buffer`).
    The gather copies every source before any destination is written, so overlapping src/dst sets
    (compaction moves tokens toward the front of the same row) are safe.
    """
    if len(k_buffers) != plan.num_layers or len(v_buffers) != plan.num_layers:
        raise ValueError(f"plan has {plan.num_layers} layers, got {len(k_buffers)} K and {len(v_buffers)} V buffers")
    for (src, dst), k, v in zip(plan.copies, k_buffers, v_buffers):
        if src.numel():
            src, dst = src.to(k.device), dst.to(k.device)
            k[dst] = k[src]
            v[dst] = v[src]
