"""Per-layer decode tables (FlashInfer `kv_indptr` / `kv_indices`, page size 1) over kept tokens.

A request whose KV was trimmed after prefill (`compression/selection.py`) attends, at layer l, its
kept prompt tokens — compacted into row[0 : kept_lens[r, l]] of its req_to_token row r — and every
decode token, row[prompt_lens[r] : seq_len]. An untrimmed request has kept_lens[r] = prompt_lens[r]
= 0, which reads row[0 : seq_len]: SGLang's own table. One launch builds all layers' tables from
the device-side length tables and req_to_token, like SGLang's `create_flashinfer_kv_indices_triton`;
there is no host work or synchronisation, so it can run inside a captured decode graph.
Reference: `kept_kv_indices_reference.py`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

_BLOCK = 512  # slots copied per step


@triton.jit
def _copy_range(src, dst, n, BLOCK: tl.constexpr):
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK).to(tl.int64)
        mask = offs < n
        tl.store(dst + offs, tl.load(src + offs, mask=mask), mask=mask)


@triton.jit
def _kept_kv_indices_kernel(
    req_to_token,  # [rows, max_context] int32
    req_pool_indices,  # [bs] int
    seq_lens,  # [bs] int
    kept_lens,  # [rows, L] int32: prompt tokens layer l keeps, compacted to row[0 : kept]
    prompt_lens,  # [rows] int32: decode tokens start at row[prompt]
    kv_indptr,  # [L, bs + 1] int32
    kv_indices,  # [L, capacity] int32
    stride_rr, stride_kr, stride_pl, stride_il,
    BLOCK: tl.constexpr,
):
    b, layer = tl.program_id(0), tl.program_id(1)
    r = tl.load(req_pool_indices + b).to(tl.int64)
    seq = tl.load(seq_lens + b).to(tl.int32)
    kept = tl.load(kept_lens + r * stride_kr + layer)
    prompt = tl.load(prompt_lens + r)
    row = req_to_token + r * stride_rr
    out = kv_indices + layer.to(tl.int64) * stride_il + tl.load(kv_indptr + layer * stride_pl + b)
    _copy_range(row, out, kept, BLOCK)
    _copy_range(row + prompt, out + kept, seq - prompt, BLOCK)


def kept_kv_lens(req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, kept_lens: torch.Tensor,
                 prompt_lens: torch.Tensor) -> torch.Tensor:
    """[L, bs] int32 attention length of request b at layer l: kept + (seq_len - prompt_len)."""
    rows = req_pool_indices.long()
    return (kept_lens[rows].T + (seq_lens.to(torch.int32) - prompt_lens[rows])[None, :]).to(torch.int32)


def kept_kv_indices(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor,
                    kept_lens: torch.Tensor, prompt_lens: torch.Tensor, kv_indptr: Optional[torch.Tensor] = None,
                    kv_indices: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's decode table of a batch, in one launch.

    req_to_token:     [rows, max_context] int32 (SGLang's ReqToTokenPool.req_to_token)
    req_pool_indices: [bs] row of each request; seq_lens: [bs] its length (every prompt and decode token)
    kept_lens:        [rows, L] int32; prompt_lens: [rows] int32 (zeros for an untrimmed request)
    kv_indptr:        optional [L, >= bs + 1] int32 buffer (CUDA graphs: fixed buffers); filled
    kv_indices:       optional [L, capacity] int32 buffer, capacity >= the longest layer's total
                      (checked on CPU only); without it one is allocated (reading the totals back:
                      a synchronisation)
    Returns (kv_indptr [L, bs + 1], kv_indices [L, capacity]): layer l's table of request b is
    kv_indices[l, kv_indptr[l, b] : kv_indptr[l, b + 1]]; entries past kv_indptr[l, bs] are untouched.
    """
    if kept_lens.dim() != 2 or kept_lens.dtype != torch.int32 or prompt_lens.dtype != torch.int32:
        raise ValueError(f"kept_lens must be [rows, L] int32 and prompt_lens [rows] int32, got "
                         f"{tuple(kept_lens.shape)} {kept_lens.dtype}, {prompt_lens.dtype}")
    if req_to_token.dtype != torch.int32 or req_to_token.stride(-1) != 1:
        raise ValueError(f"req_to_token must be row-contiguous int32, got {req_to_token.dtype}")
    bs, layers = req_pool_indices.numel(), kept_lens.shape[1]
    lens = kept_kv_lens(req_pool_indices, seq_lens, kept_lens, prompt_lens)
    if kv_indptr is None:
        kv_indptr = torch.empty(layers, bs + 1, dtype=torch.int32, device=req_to_token.device)
    if kv_indptr.shape[0] != layers or kv_indptr.shape[1] < bs + 1 or kv_indptr.dtype != torch.int32:
        raise ValueError(f"kv_indptr must be [{layers}, >= {bs + 1}] int32, got {tuple(kv_indptr.shape)} {kv_indptr.dtype}")
    kv_indptr[:, 0] = 0
    torch.cumsum(lens, dim=1, out=kv_indptr[:, 1: bs + 1])
    if kv_indices is None:
        kv_indices = torch.empty(layers, max(1, int(kv_indptr[:, bs].max()) if bs else 1), dtype=torch.int32,
                                 device=req_to_token.device)
    if kv_indices.dim() != 2 or kv_indices.shape[0] != layers or kv_indices.dtype != torch.int32:
        raise ValueError(f"kv_indices must be [{layers}, capacity] int32, got {tuple(kv_indices.shape)}")
    # The capacity is checked where that is free (CPU); on the GPU reading the totals back would
    # synchronise every decode step (and cannot be captured): the caller sizes the buffer.
    if bs and kv_indptr.device.type == "cpu" and int(kv_indptr[:, bs].max()) > kv_indices.shape[1]:
        raise ValueError(f"kv_indices holds {kv_indices.shape[1]} slots per layer, the batch needs "
                         f"{int(kv_indptr[:, bs].max())}")
    if bs:
        _kept_kv_indices_kernel[(bs, layers)](
            req_to_token, req_pool_indices, seq_lens, kept_lens, prompt_lens, kv_indptr, kv_indices,
            req_to_token.stride(0), kept_lens.stride(0), kv_indptr.stride(0), kv_indices.stride(0), BLOCK=_BLOCK)
    return kv_indptr[:, : bs + 1], kv_indices
