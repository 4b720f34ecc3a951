"""Post-vision attention scores over a request's paged KV, without the tau x m matrix.

VL-Cache (arXiv 2410.23317) ranks prompt tokens at layer l by how much the post-vision queries
(the text after the last image) attend to them, s_l(j) = sum_{h, i} A'_l[h, i, j], and sizes layer
l's budget by the sparsity of A'_l: the share of visible entries below 1 % of their row's maximum.
FlashInfer returns neither probabilities nor row maxima, and A'_l of a 40K-token prompt is
tau x 40K per head, so two passes stream the request's keys (through `req_to_token`) instead:

  pass 1 (`_row_stats_kernel`): per (query, head) the row maximum M and sum of exp2(s - M), per
          key split, merged on the host into M and the log-sum-exp (tiny [splits, tau, heads]);
  pass 2 (`_scores_kernel`):    p = exp2(s - lse) per tile of keys; p summed over the tile's rows
          into a per-(query tile, KV head) partial of s(j) (each key written by one program, no
          atomics, deterministic), and entries with s - M < log2(threshold) counted per row.

One program = BLOCK_ROWS rows (BLOCK_ROWS // GROUP queries x the GROUP query heads of one KV head)
x one key split, the layout of `scattered_attention.py`: each gathered K block serves every query
head that shares it. Only keys [0, q_position] of each query are read; slots outside the request
are never touched (tested with NaN-poisoned pools). Reference: `attention_scores_reference.py`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from vlcache_sglang.kernels.scattered_attention import _dot, choose_splits

DEFAULT_BLOCK_ROWS = 64
DEFAULT_BLOCK_N = 64
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# Arguments that change from request to request (query count, prompt length, splits, the strides of
# buffers sized by them; the request's req_to_token row, whose alignment follows its row index).
# Triton would otherwise compile a variant per value class (== 1, divisible by 16, aligned or not) at
# the first request of each class, inside its TTFT: on the H200 the first two 4x4K requests of a warm
# server spent 1.9 and 0.6 s more between their last prefill chunk and their first token than the third
# (0.04 s), the pattern of first-use compilation. Names a kernel lacks are ignored (Triton matches them
# against its parameters).
_PER_REQUEST_INTS = ["num_q", "num_keys", "num_splits", "stride_ss", "stride_pt", "stride_ph", "stride_cs"]
_PER_REQUEST_POINTERS = ["slot_row"]


@triton.jit
def _rows(tile, kv_head, num_q, GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Row r: query tile * BLOCK_M + r // GROUP, head kv_head * GROUP + r % GROUP; valid if it exists."""
    block_m = BLOCK_ROWS // GROUP
    r = tl.arange(0, BLOCK_ROWS)
    qi = tile * block_m + r // GROUP
    return qi.to(tl.int64), kv_head * GROUP + r % GROUP, (r // GROUP < block_m) & (qi < num_q)


@triton.jit
def _split_range(max_pos, num_splits, split, BLOCK_N: tl.constexpr):
    """Keys [lo, hi) of this split of [0, max_pos]: equal shares in whole blocks."""
    num_keys = max_pos + 1
    share = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
    lo = split * share
    return lo, tl.minimum(lo + share, num_keys)


@triton.jit
def _query_tile(q, q_pos, tile, kv_head, num_q, stride_qt, stride_qh,
                GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's rows: (query index, head, valid, position, q [BLOCK_ROWS, BLOCK_D], d, dmask)."""
    qi, head, valid = _rows(tile, kv_head, num_q, GROUP, BLOCK_ROWS)
    pos = tl.load(q_pos + qi, mask=valid, other=-1)  # a padding row sees no key
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    qv = tl.load(q + qi[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                 mask=valid[:, None] & dmask[None, :], other=0.0)
    return qi, head, valid, pos, qv, d, dmask


@triton.jit
def _key_block(k_cache, slot_row, start, hi, kv_off, d, dmask, stride_kt, BLOCK_N: tl.constexpr):
    """Keys [start, start + BLOCK_N) ∩ [.., hi): (their indices j, in-range mask, K^T [BLOCK_D, BLOCK_N])."""
    j = start + tl.arange(0, BLOCK_N)
    jmask = j < hi
    slots = tl.load(slot_row + j, mask=jmask, other=0).to(tl.int64)
    k = tl.load(k_cache + slots[None, :] * stride_kt + kv_off + d[:, None],
                mask=jmask[None, :] & dmask[:, None], other=0.0)
    return j, jmask, k


@triton.jit(do_not_specialize=_PER_REQUEST_INTS, do_not_specialize_on_alignment=_PER_REQUEST_POINTERS)
def _row_stats_kernel(
    q,  # [tau, num_qo_heads, head_dim]
    k_cache,  # [slots, num_kv_heads, head_dim]
    slot_row,  # [>= num_keys] int32: req_to_token[req_row]
    q_pos,  # [tau] int32
    row_max,  # [splits, tau, num_qo_heads] fp32: max of s (base-2 logits) over the split's visible keys
    row_sum,  # [splits, tau, num_qo_heads] fp32: sum of exp2(s - row_max) over them
    num_q, scale_log2, num_splits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_ss, stride_st,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    qi, head, valid, pos, qv, d, dmask = _query_tile(q, q_pos, tile, kv_head, num_q, stride_qt, stride_qh,
                                                     GROUP, HEAD_DIM, BLOCK_ROWS, BLOCK_D)
    kv_off = kv_head.to(tl.int64) * stride_kh
    lo, hi = _split_range(tl.max(pos, 0), num_splits, split, BLOCK_N)
    m_i = tl.zeros([BLOCK_ROWS], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        j, jmask, k = _key_block(k_cache, slot_row, start, hi, kv_off, d, dmask, stride_kt, BLOCK_N)
        s = _dot(qv, k, UPCAST_DOT, DOT_PRECISION) * scale_log2
        s = tl.where((j[None, :] <= pos[:, None]) & jmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # no key seen yet: p = alpha = 0, not NaN
        l_i = l_i * tl.math.exp2(m_i - m_ref) + tl.sum(tl.math.exp2(s - m_ref[:, None]), 1)
        m_i = m_new
    out = split * stride_ss + qi * stride_st + head
    tl.store(row_max + out, m_i, mask=valid)
    tl.store(row_sum + out, l_i, mask=valid)


@triton.jit(do_not_specialize=_PER_REQUEST_INTS, do_not_specialize_on_alignment=_PER_REQUEST_POINTERS)
def _scores_kernel(
    q, k_cache, slot_row, q_pos,
    row_max,  # [tau, num_qo_heads] fp32, merged over splits
    lse,  # [tau, num_qo_heads] fp32, log2-sum-exp2 of the row's visible logits
    score_part,  # [query tiles, num_kv_heads, num_keys] fp32, zeros: s(j) of this tile's rows
    sparse_part,  # [splits, tau, num_qo_heads] int32: the split's entries below threshold x row max
    num_q, num_keys, scale_log2, log2_threshold, num_splits,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_st, stride_pt, stride_ph, stride_cs, stride_ct,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    qi, head, valid, pos, qv, d, dmask = _query_tile(q, q_pos, tile, kv_head, num_q, stride_qt, stride_qh,
                                                     GROUP, HEAD_DIM, BLOCK_ROWS, BLOCK_D)
    stat = qi * stride_st + head
    m_row = tl.load(row_max + stat, mask=valid, other=0.0)
    lse_row = tl.load(lse + stat, mask=valid, other=0.0)
    kv_off = kv_head.to(tl.int64) * stride_kh
    part = score_part + tile * stride_pt + kv_head * stride_ph
    lo, hi = _split_range(tl.max(pos, 0), num_splits, split, BLOCK_N)
    sparse = tl.zeros([BLOCK_ROWS], dtype=tl.int32)
    for start in range(lo, hi, BLOCK_N):
        j, jmask, k = _key_block(k_cache, slot_row, start, hi, kv_off, d, dmask, stride_kt, BLOCK_N)
        s = _dot(qv, k, UPCAST_DOT, DOT_PRECISION) * scale_log2
        seen = (j[None, :] <= pos[:, None]) & jmask[None, :]
        p = tl.where(seen, tl.math.exp2(s - lse_row[:, None]), 0.0)
        tl.store(part + j, tl.sum(p, 0), mask=jmask & (j < num_keys))
        sparse += tl.sum((seen & (s - m_row[:, None] < log2_threshold)).to(tl.int32), 1)
    tl.store(sparse_part + split * stride_cs + qi * stride_ct + head, sparse, mask=valid)


_INTERPRETED = isinstance(_row_stats_kernel, InterpretedFunction)  # TRITON_INTERPRET=1


def post_vision_scores(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_row: int,
    q_positions: torch.Tensor,
    num_keys: int,
    sm_scale: float,
    threshold: float = 0.01,
    num_splits: Optional[int] = None,
    block_rows: int = DEFAULT_BLOCK_ROWS,
    block_n: int = DEFAULT_BLOCK_N,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token scores and sparse counts of A' = softmax(q K^T * sm_scale) for one request and layer.

    q:            [tau, num_qo_heads, head_dim] post-vision queries (after RoPE), head_dim contiguous
    k_cache:      [slots, num_kv_heads, head_dim] the layer's K buffer (SGLang `k_buffer[layer]`),
                  q's dtype; query head h reads KV head h // (num_qo_heads // num_kv_heads)
    req_to_token: [rows, max_context] int32; key j of the request lives at slot req_to_token[req_row, j]
    q_positions:  [tau] int, position of query i in the request: it sees keys [0, q_positions[i]]
    num_keys:     m, the prompt length: every q_position < m; scores are returned for keys [0, m)
    threshold:    an entry is sparse below threshold x its row's maximum (VL-Cache: 1 %)
    num_splits:   key splits per query tile (grid axis 2); None: 1 on CPU, enough to fill the GPU
    Returns (scores [m] float32 = sum_{i, h} A'[h, i, j]; sparse [tau, num_qo_heads] int32), as
    `post_vision_scores_reference`.
    """
    tau, qo_heads, head_dim = _check(q, k_cache, req_to_token, req_row, q_positions, num_keys, threshold)
    kv_heads = k_cache.shape[1]
    group = qo_heads // kv_heads
    for name, size in (("block_rows", block_rows), ("block_n", block_n)):
        if size < 16 or size & (size - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {size}")
    block_rows = max(block_rows, triton.next_power_of_2(group))
    device = q.device
    scores = torch.zeros(num_keys, dtype=torch.float32, device=device)
    if tau == 0:
        return scores, torch.zeros(0, qo_heads, dtype=torch.int32, device=device)
    tiles = -(-tau // (block_rows // group))
    splits = num_splits or choose_splits(tiles, kv_heads, int(q_positions.max()) + 1, device)
    slot_row = req_to_token[req_row]
    q_pos = q_positions.to(device=device, dtype=torch.int32).contiguous()
    scale_log2 = sm_scale * math.log2(math.e)
    block_d = triton.next_power_of_2(head_dim)
    meta = dict(GROUP=group, HEAD_DIM=head_dim, BLOCK_ROWS=block_rows, BLOCK_N=block_n, BLOCK_D=block_d,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16)
    grid = (tiles, kv_heads, splits)
    part_max = torch.empty(splits, tau, qo_heads, dtype=torch.float32, device=device)
    part_sum = torch.empty_like(part_max)
    _row_stats_kernel[grid](
        q, k_cache, slot_row, q_pos, part_max, part_sum, tau, scale_log2, splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), part_max.stride(0), part_max.stride(1),
        **meta)
    row_max, lse = _merge_splits(part_max, part_sum)
    score_part = torch.zeros(tiles, kv_heads, num_keys, dtype=torch.float32, device=device)
    sparse_part = torch.empty(splits, tau, qo_heads, dtype=torch.int32, device=device)
    _scores_kernel[grid](
        q, k_cache, slot_row, q_pos, row_max, lse, score_part, sparse_part,
        tau, num_keys, scale_log2, math.log2(threshold), splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), row_max.stride(0),
        score_part.stride(0), score_part.stride(1), sparse_part.stride(0), sparse_part.stride(1),
        **meta)
    return score_part.sum((0, 1)), sparse_part.sum(0, dtype=torch.int32)


def compile_for(num_qo_heads: int, k_cache: torch.Tensor) -> None:
    """Compile both passes for this layer shape (k_cache: a layer's K buffer) now, not inside the first
    compressed request's TTFT: with the per-request arguments unspecialised, the one binary a small
    dummy request builds is the one every request runs."""
    keys, (kv_heads, head_dim) = 64, k_cache.shape[1:]
    k = torch.zeros(keys, kv_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
    q = torch.zeros(2, num_qo_heads, head_dim, dtype=k_cache.dtype, device=k_cache.device)
    req_to_token = torch.arange(keys, dtype=torch.int32, device=k_cache.device).unsqueeze(0)
    post_vision_scores(q, k, req_to_token, 0, torch.tensor([keys - 2, keys - 1]), keys, head_dim ** -0.5)


def _merge_splits(part_max: torch.Tensor, part_sum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row max and log2-sum-exp2 over splits ([splits, tau, heads] -> [tau, heads]); every real row
    sees key 0, so some split of it is finite."""
    row_max = part_max.amax(0)
    total = (part_sum * torch.exp2(part_max - row_max)).sum(0)
    return row_max.contiguous(), (row_max + torch.log2(total)).contiguous()


def _check(q: torch.Tensor, k_cache: torch.Tensor, req_to_token: torch.Tensor, req_row: int,
           q_positions: torch.Tensor, num_keys: int, threshold: float) -> tuple[int, int, int]:
    if q.dim() != 3 or k_cache.dim() != 3 or q.shape[2] != k_cache.shape[2]:
        raise ValueError(f"q must be [tau, qo_heads, head_dim] and k_cache [slots, kv_heads, head_dim] of one "
                         f"head_dim, got {tuple(q.shape)} and {tuple(k_cache.shape)}")
    tau, qo_heads, head_dim = q.shape
    if qo_heads % k_cache.shape[1]:
        raise ValueError(f"num_qo_heads ({qo_heads}) must be a multiple of num_kv_heads ({k_cache.shape[1]})")
    if q.dtype not in _DTYPES or k_cache.dtype != q.dtype:
        raise NotImplementedError(f"q and k_cache must share one of {list(_DTYPES)}, got {q.dtype} and "
                                  f"{k_cache.dtype} (an fp8 KV cache is not supported)")
    if q.stride(-1) != 1 or k_cache.stride(-1) != 1:
        raise ValueError(f"q and k_cache need a contiguous head_dim, got strides {q.stride()}, {k_cache.stride()}")
    if req_to_token.dim() != 2 or req_to_token.dtype != torch.int32 or req_to_token.stride(-1) != 1:
        raise ValueError(f"req_to_token must be a row-contiguous 2-D int32 tensor (SGLang's ReqToTokenPool), got "
                         f"{tuple(req_to_token.shape)} {req_to_token.dtype}")
    if not 0 <= req_row < req_to_token.shape[0] or not 0 <= num_keys <= req_to_token.shape[1]:
        raise ValueError(f"req_row {req_row} / num_keys {num_keys} outside req_to_token {tuple(req_to_token.shape)}")
    if q_positions.shape != (tau,):
        raise ValueError(f"q_positions must be [{tau}], got {tuple(q_positions.shape)}")
    if tau and (int(q_positions.min()) < 0 or int(q_positions.max()) >= num_keys):
        raise ValueError(f"query positions must lie in [0, num_keys = {num_keys}), got "
                         f"[{int(q_positions.min())}, {int(q_positions.max())}]")
    if not 0.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in (0, 1), got {threshold}")
    return tau, qo_heads, head_dim
