"""Attention of scattered query tokens over their requests' KV, gathered through req_to_token.

Query t belongs to request row r_t at request position p_t and attends keys j in [0, p_t] of that
request (slots `req_to_token[r_t, j]`): the ordinary causal mask, whatever else of the request is
or is not a query. When the queries are few and scattered (a recompute policy picks 2-5 % of an
image's tokens anywhere), FlashInfer's prefill with one "request" per contiguous run re-reads the
whole KV prefix for every short run. Here one program takes BLOCK_M queries of one request, however
far apart, and streams that request's KV once for all of them, with a per-query causal mask.

Plan/run like FlashInfer: `plan()` builds the tile table once per token set (host work), `run()`
launches once per layer with that layer's q and pool buffers. Reference:
`scattered_attention_reference.py`.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

# Query rows per program: BLOCK_M = BLOCK_ROWS // group queries, each with its group's heads.
# 128 x 64 was the fastest tile on an H200 in 9 of 10 attention_bench.py rows (7B heads, bf16).
DEFAULT_BLOCK_ROWS = 128
DEFAULT_BLOCK_N = 64  # keys per step
_TILE_FIELDS = 5  # q_start, q_len, req_row, min_pos, max_pos
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# An unused tile of a fixed-size table: no queries, no keys (both key loops are empty, nothing stored).
EMPTY_TILE = torch.tensor([[0, 0, 0, -1, -1]], dtype=torch.int32)


# Split-KV: enough key ranges per tile for ~2 programs per SM, each at least this many keys long.
MAX_SPLITS = 16
MIN_KEYS_PER_SPLIT = 256


def choose_splits(num_tiles: int, num_kv_heads: int, max_keys: int, device: torch.device) -> int:
    """Key splits per tile: 1 on CPU (the interpreter) or when the tiles alone fill the GPU."""
    if device.type != "cuda" or num_tiles == 0:
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    want = -(-2 * sms // (num_tiles * num_kv_heads))
    return max(1, min(want, MAX_SPLITS, max_keys // MIN_KEYS_PER_SPLIT))


class CapacityError(ValueError):
    """A plan larger than a fixed-capacity ScatteredAttention holds."""


# Arguments that change from batch to batch in the eager loop (the split count; the partials' strides,
# sized by the batch's query count): unspecialised, so a new batch shape never compiles a new variant
# inside a request (Triton specialises ints on == 1 and divisibility by 16). Graph replays fix them anyway.
_PER_BATCH_INTS = ["num_splits", "stride_os", "stride_ls"]


@triton.jit
def _dot(a, b, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    # Triton 3.6's interpreter multiplies bf16 operands as their raw uint16 bits; there, products
    # are taken in fp32, which is what bf16 MMA with fp32 accumulation computes on a GPU.
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _tile_rows(tiles, tile, kv_head, GROUP: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """Row r of a program: query r // GROUP of the tile (token index), head r % GROUP of the KV
    head's group, and whether that query exists (a tile may be short or empty)."""
    q_start = tl.load(tiles + tile * 5 + 0)
    q_len = tl.load(tiles + tile * 5 + 1)
    r = tl.arange(0, BLOCK_ROWS)
    m = r // GROUP
    return (q_start + m).to(tl.int64), kv_head * GROUP + r % GROUP, m < q_len


@triton.jit(do_not_specialize=_PER_BATCH_INTS)
def _scattered_attention_kernel(
    q,  # [n, num_qo_heads, head_dim]
    k_cache,  # [slots, num_kv_heads, head_dim]
    v_cache,  # [slots, num_kv_heads, head_dim]
    out,  # [n, num_qo_heads, head_dim]; with SPLIT: o_part [splits, n, num_qo_heads, head_dim] fp32
    lse_part,  # with SPLIT: [splits, n, num_qo_heads] fp32, log2-sum-exp2 of each split's scores
    req_to_token,  # [rows, max_context] int32 slot ids
    q_pos,  # [n] int32 request position of each query
    tiles,  # [T, 5] int32: q_start, q_len, req_row, min_pos, max_pos
    scale_log2,  # sm_scale * log2(e): softmax in base 2
    num_splits,  # key ranges per tile (grid axis 2)
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    stride_rr,
    SPLIT: tl.constexpr,  # num_splits > 1: write per-split partials for _merge_splits_kernel
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,  # >= BLOCK_M * GROUP, power of two
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    # One program = one tile of queries x one KV head with its GROUP query heads. Row r of the
    # program is query r // GROUP, head r % GROUP: each gathered K/V block (the expensive, random
    # reads) serves every query head that shares it, and the GROUP heads fill the MMA rows even
    # when a tile has few queries. One query head per program would read each K/V block GROUP
    # times (7 for Qwen2.5-VL-7B).
    #
    # Split-KV (flash-decoding): program (tile, head, split) walks only its split's share of the
    # tile's keys [0, max_pos]. A few hundred queries over a 42K-token context are a few dozen
    # tiles x 4 KV heads: without splits, fewer programs than SMs, each walking every key.
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    tok, head, valid = _tile_rows(tiles, tile, kv_head, GROUP, BLOCK_ROWS)
    req_row = tl.load(tiles + tile * 5 + 2).to(tl.int64)
    min_pos = tl.load(tiles + tile * 5 + 3)
    max_pos = tl.load(tiles + tile * 5 + 4)
    # Padding rows attend key 0 only: a finite softmax, never stored.
    pos = tl.load(q_pos + tok, mask=valid, other=0)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    qv = tl.load(q + tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :],
                 mask=valid[:, None] & dmask[None, :], other=0.0)

    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_ROWS], dtype=tl.float32) - float("inf")
    slot_row = req_to_token + req_row * stride_rr
    kv_off = kv_head.to(tl.int64)
    n_offs = tl.arange(0, BLOCK_N)

    # This split's keys [lo, hi): equal shares in whole blocks (an empty tile has no keys at all).
    num_keys = max_pos + 1
    share = tl.cdiv(tl.cdiv(num_keys, num_splits), BLOCK_N) * BLOCK_N
    lo = split * share
    hi = tl.minimum(lo + share, num_keys)

    # Keys [0, min_pos] are visible to every query of the tile: whole blocks there need no mask, and
    # every row sees every key of them (m_i finite after the first).
    unmasked_end = ((min_pos + 1) // BLOCK_N) * BLOCK_N
    for start in range(lo, tl.minimum(hi, unmasked_end), BLOCK_N):
        slots = tl.load(slot_row + start + n_offs).to(tl.int64)
        k = tl.load(k_cache + slots[None, :] * stride_kt + kv_off * stride_kh + d[:, None],
                    mask=dmask[:, None], other=0.0)
        s = _dot(qv, k, UPCAST_DOT, DOT_PRECISION) * scale_log2
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + slots[:, None] * stride_vt + kv_off * stride_vh + d[None, :],
                    mask=dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new

    # Blocks up to the tile's last position: keys past a query's own position are masked, and no
    # block past the tile's furthest query is visited at all. A row may see none of a split's keys
    # so far (m = -inf): exponents are then taken against 0, giving p = alpha = 0, not NaN.
    for start in range(tl.maximum(lo, unmasked_end), hi, BLOCK_N):
        j = start + n_offs
        jmask = j < hi
        slots = tl.load(slot_row + j, mask=jmask, other=0).to(tl.int64)
        k = tl.load(k_cache + slots[None, :] * stride_kt + kv_off * stride_kh + d[:, None],
                    mask=jmask[None, :] & dmask[:, None], other=0.0)
        s = _dot(qv, k, UPCAST_DOT, DOT_PRECISION) * scale_log2
        s = tl.where((j[None, :] <= pos[:, None]) & jmask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_ref[:, None])
        alpha = tl.math.exp2(m_i - m_ref)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache + slots[:, None] * stride_vt + kv_off * stride_vh + d[None, :],
                    mask=jmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, UPCAST_DOT, DOT_PRECISION)
        m_i = m_new

    # l_i = 0: an empty tile (fixed-size tables), or a split none of whose keys this row sees.
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if SPLIT:
        lse = tl.where(l_i > 0, m_i + tl.math.log2(l_i), float("-inf"))
        tl.store(lse_part + split * stride_ls + tok * stride_lt + head, lse, mask=valid)
        tl.store(out + split * stride_os + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 acc, mask=valid[:, None] & dmask[None, :])
    else:
        tl.store(out + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                 acc.to(out.dtype.element_ty), mask=valid[:, None] & dmask[None, :])


@triton.jit(do_not_specialize=_PER_BATCH_INTS)
def _merge_splits_kernel(
    o_part,  # [splits, n, num_qo_heads, head_dim] fp32, each split normalised by itself
    lse_part,  # [splits, n, num_qo_heads] fp32, log2-sum-exp2 (-inf: the split saw no key)
    out,  # [n, num_qo_heads, head_dim]
    tiles,  # the attention kernel's tile table: only rows of planned queries are merged
    num_splits,
    stride_os, stride_ot, stride_oh,
    stride_ls, stride_lt,
    stride_out_t, stride_out_h,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Same tile -> row mapping as the attention kernel, so padding queries of a fixed-capacity
    # table (in no tile) are never read from the partials, whose rows for them are stale.
    tok, head, valid = _tile_rows(tiles, tl.program_id(0), tl.program_id(1), GROUP, BLOCK_ROWS)
    d = tl.arange(0, BLOCK_D)
    mask = valid[:, None] & (d < HEAD_DIM)[None, :]
    acc = tl.zeros([BLOCK_ROWS, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_ROWS], dtype=tl.float32)
    m_i = tl.zeros([BLOCK_ROWS], dtype=tl.float32) - float("inf")
    for split in range(0, num_splits):
        lse = tl.load(lse_part + split * stride_ls + tok * stride_lt + head, mask=valid, other=float("-inf"))
        o = tl.load(o_part + split * stride_os + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :],
                    mask=mask, other=0.0)
        m_new = tl.maximum(m_i, lse)
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_ref)
        w = tl.math.exp2(lse - m_ref)
        acc = acc * alpha[:, None] + w[:, None] * o
        l_i = l_i * alpha + w
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(out + tok[:, None] * stride_out_t + head[:, None] * stride_out_h + d[None, :],
             acc.to(out.dtype.element_ty), mask=mask)


def build_tiles(q_req_rows: torch.Tensor, q_positions: torch.Tensor, block_m: int) -> torch.Tensor:
    """Tile table [T, 5] int32 (CPU): q_start, q_len, req_row, min_pos, max_pos per tile.

    A tile is up to block_m consecutive queries of one request (a new tile starts wherever the
    request row changes). Tiles are ordered by max_pos, longest first, so the programs that walk
    the most KV start first and the short ones fill in behind them.
    """
    n = q_req_rows.numel()
    if n == 0:
        return torch.empty(0, _TILE_FIELDS, dtype=torch.int32)
    # numpy: a plan may run once per layer, and these small ops cost ~1 us each there vs ~8 in torch.
    rows = q_req_rows.cpu().numpy().astype(np.int64, copy=False)
    pos = q_positions.cpu().numpy().astype(np.int64, copy=False)
    idx = np.arange(n)
    new_req = np.ones(n, dtype=bool)
    new_req[1:] = rows[1:] != rows[:-1]
    req_start = np.maximum.accumulate(np.where(new_req, idx, 0))
    starts = np.flatnonzero((idx - req_start) % block_m == 0)
    min_pos = np.minimum.reduceat(pos, starts)
    max_pos = np.maximum.reduceat(pos, starts)
    table = np.stack([starts, np.diff(starts, append=n), rows[starts], min_pos, max_pos], axis=1)
    return torch.from_numpy(table[np.argsort(-max_pos, kind="stable")].astype(np.int32))


_INTERPRETED = isinstance(_scattered_attention_kernel, InterpretedFunction)  # TRITON_INTERPRET=1


class ScatteredAttention:
    """plan(): once per token set; run(): per layer. The Triton kernel above."""

    def __init__(self, capacity: Optional[tuple[int, int]] = None, num_splits: Optional[int] = None) -> None:
        """capacity: (max queries, max tiles) for CUDA graphs. plan() then fills fixed buffers (unused
        tiles padded empty) and run() takes q padded to max queries and launches a fixed grid, so a
        graph captured around run() replays correctly after any later plan within the capacity.

        num_splits: key ranges per tile (split-KV), fixed; None chooses per plan (`choose_splits`),
        or once at the first plan with a capacity (a graph's grid cannot change)."""
        self._capacity = capacity
        self._fixed_splits = num_splits
        self._num_splits = 1
        self._tiles: Optional[torch.Tensor] = None
        self._q_pos: Optional[torch.Tensor] = None
        self._req_to_token: Optional[torch.Tensor] = None
        self._shape: tuple[int, int, int, int] = (0, 0, 0, 0)  # n, qo heads, kv heads, head_dim
        self._scale_log2 = 0.0
        self._block_rows = DEFAULT_BLOCK_ROWS
        self._block_n = DEFAULT_BLOCK_N

    @staticmethod
    def supports(q_dtype: torch.dtype, kv_dtype: torch.dtype) -> bool:
        """Whether the kernel runs these dtypes: K/V are read in q's dtype (no fp8 KV cache)."""
        return q_dtype == kv_dtype and q_dtype in _DTYPES

    @staticmethod
    def block_m(num_qo_heads: int, num_kv_heads: int, block_rows: int = DEFAULT_BLOCK_ROWS) -> int:
        """Queries per tile: as many as fill block_rows with their group's heads (at least 1)."""
        return max(1, block_rows // (num_qo_heads // num_kv_heads))

    def plan(
        self,
        q_req_rows: torch.Tensor,
        q_positions: torch.Tensor,
        req_to_token: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sm_scale: float,
        block_rows: int = DEFAULT_BLOCK_ROWS,
        block_n: int = DEFAULT_BLOCK_N,
    ) -> None:
        """Tile the token set.

        q_req_rows:   [n] req_to_token row of each query (queries of a request kept together)
        q_positions:  [n] position of each query within its request: it sees keys [0, position]
        req_to_token: [rows, max_context] int32 on the run device; read at run time, so the slots of
            keys [0, position] of every planned query must be written there before run()
        block_rows, block_n: power-of-two tile sizes (tuning; the defaults suit H100/H200)
        """
        if q_req_rows.shape != q_positions.shape or q_req_rows.dim() != 1:
            raise ValueError(f"q_req_rows and q_positions must be 1-D of one length, got "
                             f"{tuple(q_req_rows.shape)} and {tuple(q_positions.shape)}")
        if num_kv_heads <= 0 or num_qo_heads % num_kv_heads:
            raise ValueError(f"num_qo_heads ({num_qo_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
        for name, size in (("block_rows", block_rows), ("block_n", block_n)):
            if size < 16 or size & (size - 1):
                raise ValueError(f"{name} must be a power of two >= 16 (tl.dot), got {size}")
        if req_to_token.dim() != 2 or req_to_token.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"req_to_token must be a 2-D integer tensor, got {tuple(req_to_token.shape)} "
                             f"{req_to_token.dtype}")
        group = num_qo_heads // num_kv_heads
        block_rows = max(block_rows, triton.next_power_of_2(group))
        if q_positions.numel():
            lo, hi = int(q_positions.min()), int(q_positions.max())
            if lo < 0 or hi >= req_to_token.shape[1]:
                raise ValueError(f"positions must lie in [0, {req_to_token.shape[1]}) (req_to_token width), "
                                 f"got [{lo}, {hi}]")
        block_m = self.block_m(num_qo_heads, num_kv_heads, block_rows)
        tiles = build_tiles(q_req_rows, q_positions, block_m)
        self._num_splits = self._splits(tiles, block_m, num_kv_heads, req_to_token.device)
        n = q_positions.numel()
        if self._capacity is None:
            self._tiles = tiles.to(req_to_token.device)
            self._q_pos = q_positions.to(device=req_to_token.device, dtype=torch.int32)
        else:
            self._fill_fixed(tiles, q_positions, req_to_token.device)
            n = self._capacity[0]
        self._req_to_token = req_to_token
        self._shape = (n, num_qo_heads, num_kv_heads, head_dim)
        self._scale_log2 = sm_scale * math.log2(math.e)
        self._block_rows, self._block_n = block_rows, block_n

    def _splits(self, tiles: torch.Tensor, block_m: int, num_kv_heads: int, device: torch.device) -> int:
        if self._fixed_splits is not None:
            return self._fixed_splits
        if self._capacity is None:
            max_keys = int(tiles[0, 4]) + 1 if tiles.shape[0] else 0  # tiles come longest first
            return choose_splits(tiles.shape[0], num_kv_heads, max_keys, device)
        # Graphs: fixed from the capacity's full tiles, for any context (the programs of padding
        # tiles exit at once, but they are launched: tiles x heads x splits per layer).
        self._fixed_splits = choose_splits(-(-self._capacity[0] // block_m), num_kv_heads, 1 << 30, device)
        return self._fixed_splits

    def _fill_fixed(self, tiles: torch.Tensor, q_positions: torch.Tensor, device: torch.device) -> None:
        max_q, max_tiles = self._capacity
        if q_positions.numel() > max_q or tiles.shape[0] > max_tiles:
            raise CapacityError(f"{q_positions.numel()} queries in {tiles.shape[0]} tiles exceed the capacity of "
                                f"{max_q} queries, {max_tiles} tiles")
        if self._tiles is None:
            self._tiles = torch.empty(max_tiles, _TILE_FIELDS, dtype=torch.int32, device=device)
            self._q_pos = torch.zeros(max_q, dtype=torch.int32, device=device)
        padded = EMPTY_TILE.repeat(max_tiles, 1)
        padded[: tiles.shape[0]] = tiles
        self._tiles.copy_(padded)
        self._q_pos[: q_positions.numel()].copy_(q_positions.to(torch.int32))

    @property
    def num_tiles(self) -> int:
        return 0 if self._tiles is None else self._tiles.shape[0]

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
            out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q: [n, num_qo_heads, head_dim]; k/v_cache: [slots, num_kv_heads, head_dim], q's dtype.

        Returns (or fills `out`, same shape and dtype as q) the attention output per query and head.
        """
        if self._tiles is None:
            raise RuntimeError("run() before plan()")
        self._check(q, k_cache, v_cache)
        n, qo_heads, kv_heads, head_dim = self._shape
        if out is None and self._capacity is not None:
            # Padding queries are in no tile, so never written: zeros keep them finite downstream.
            out = torch.zeros_like(q, memory_format=torch.contiguous_format)
        elif out is None:
            out = torch.empty_like(q, memory_format=torch.contiguous_format)
        elif out.shape != q.shape or out.dtype != q.dtype or out.stride(-1) != 1:
            raise ValueError(f"out must be {tuple(q.shape)} {q.dtype} with a contiguous last dim, got "
                             f"{tuple(out.shape)} {out.dtype} stride {out.stride()}")
        if n == 0:
            return out
        splits = self._num_splits
        if splits == 1:
            self._attend(q, k_cache, v_cache, out, out, splits)
            return out
        o_part = torch.empty(splits, n, qo_heads, head_dim, dtype=torch.float32, device=q.device)
        lse_part = torch.empty(splits, n, qo_heads, dtype=torch.float32, device=q.device)
        self._attend(q, k_cache, v_cache, o_part, lse_part, splits)
        _merge_splits_kernel[(self.num_tiles, kv_heads)](
            o_part, lse_part, out, self._tiles, splits,
            o_part.stride(0), o_part.stride(1), o_part.stride(2), lse_part.stride(0), lse_part.stride(1),
            out.stride(0), out.stride(1),
            GROUP=qo_heads // kv_heads, HEAD_DIM=head_dim, BLOCK_ROWS=self._block_rows,
            BLOCK_D=triton.next_power_of_2(head_dim),
        )
        return out

    def _attend(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                lse_part: torch.Tensor, splits: int) -> None:
        """The attention kernel: into `out` directly (one split) or into the per-split partials."""
        _, qo_heads, kv_heads, head_dim = self._shape
        split = splits > 1
        block_d = triton.next_power_of_2(head_dim)
        out_strides = (out.stride(0), out.stride(1), out.stride(2)) if split else (0, out.stride(0), out.stride(1))
        lse_strides = (lse_part.stride(0), lse_part.stride(1)) if split else (0, 0)
        _scattered_attention_kernel[(self.num_tiles, kv_heads, splits)](
            q, k_cache, v_cache, out, lse_part, self._req_to_token, self._q_pos, self._tiles, self._scale_log2,
            splits, q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
            v_cache.stride(0), v_cache.stride(1), *out_strides, *lse_strides, self._req_to_token.stride(0),
            SPLIT=split,
            GROUP=qo_heads // kv_heads,
            HEAD_DIM=head_dim,
            BLOCK_ROWS=self._block_rows,
            BLOCK_N=self._block_n,
            BLOCK_D=block_d,
            DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
            UPCAST_DOT=_INTERPRETED and q.dtype == torch.bfloat16,
            num_warps=self._num_warps(block_d),
        )

    def _num_warps(self, block_d: int) -> int:
        # The gathered K/V tiles need a 64-bit address per element: at 4 warps a 64-row, 128-dim
        # tile spills registers (ptxas, sm_90a); 8 warps spread them.
        return 8 if self._block_rows * block_d >= 64 * 128 else 4

    def _check(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
        n, qo_heads, kv_heads, head_dim = self._shape
        if tuple(q.shape) != (n, qo_heads, head_dim):
            raise ValueError(f"q must be [{n}, {qo_heads}, {head_dim}] as planned, got {tuple(q.shape)}")
        for name, kv in (("k_cache", k_cache), ("v_cache", v_cache)):
            if kv.dim() != 3 or tuple(kv.shape[1:]) != (kv_heads, head_dim):
                raise ValueError(f"{name} must be [slots, {kv_heads}, {head_dim}], got {tuple(kv.shape)}")
            if kv.dtype != q.dtype:
                raise NotImplementedError(f"{name} dtype {kv.dtype} differs from q's {q.dtype}; the Triton kernel "
                                          f"needs one dtype (FlashInfer's paged prefill handles mixed dtypes)")
            if kv.stride(-1) != 1:
                raise ValueError(f"{name} needs a contiguous head_dim, got strides {kv.stride()}")
        if q.dtype not in _DTYPES:
            raise NotImplementedError(f"q dtype {q.dtype} not supported; use one of {list(_DTYPES)}")
        if q.stride(-1) != 1:
            raise ValueError(f"q needs a contiguous head_dim, got strides {q.stride()}")
