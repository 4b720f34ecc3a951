"""Fused copy-and-rotate of a reused image's KV, all layers in one launch.

A cached image's K was stored after RoPE at start position p0. M-RoPE moves all three position
axes of an image by the same δ when the image moves, and rotations compose, so one plain RoPE
rotation by δ = p1 − p0 over the whole rotary dim turns K(p0) into K(p1) exactly (up to rounding).
V is position-free and is copied as is. Both happen in the single pass that copies the image's
slots into the request's new slots of SGLang's KV pool.
"""

from __future__ import annotations

from typing import Any, Sequence, Union

import torch
import triton
import triton.language as tl

_TL_DTYPES = {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _copy_rotate_kv_kernel(
    k_ptrs,  # [L] uint64: data_ptr of layer l's K buffer [slots, heads, head_dim]
    v_ptrs,  # [L] uint64: data_ptr of layer l's V buffer [slots, heads, v_head_dim]
    src_slots,  # [N] int64
    dst_slots,  # [N] int64
    delta,  # [N] int64
    inv_freq,  # [ROT_HALF] float32
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    V_ROW: tl.constexpr,  # heads * v_head_dim
    ROT_HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_V: tl.constexpr,
    DTYPE: tl.constexpr,
):
    tok = tl.program_id(0)
    layer = tl.program_id(1)
    src = tl.load(src_slots + tok)
    dst = tl.load(dst_slots + tok)
    d = tl.load(delta + tok).to(tl.float32)

    k_base = tl.load(k_ptrs + layer).to(tl.pointer_type(DTYPE))
    heads = tl.arange(0, BLOCK_H)[:, None]
    i = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < NUM_HEADS) & (i < ROT_HALF)
    freq = tl.load(inv_freq + i, mask=i < ROT_HALF, other=0.0)
    ang = d * freq
    c = tl.cos(ang)
    s = tl.sin(ang)
    src_row = k_base + src * (NUM_HEADS * HEAD_DIM) + heads * HEAD_DIM
    dst_row = k_base + dst * (NUM_HEADS * HEAD_DIM) + heads * HEAD_DIM
    x1 = tl.load(src_row + i, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_row + ROT_HALF + i, mask=mask, other=0.0).to(tl.float32)
    # Load both halves before storing, so src == dst (rotate in place) is safe.
    tl.store(dst_row + i, (x1 * c - x2 * s).to(DTYPE), mask=mask)
    tl.store(dst_row + ROT_HALF + i, (x2 * c + x1 * s).to(DTYPE), mask=mask)
    if 2 * ROT_HALF < HEAD_DIM:  # partial rotary: the tail of each head passes through
        j = 2 * ROT_HALF + tl.arange(0, BLOCK_PASS)[None, :]
        pmask = (heads < NUM_HEADS) & (j < HEAD_DIM)
        tl.store(dst_row + j, tl.load(src_row + j, mask=pmask), mask=pmask)

    v_base = tl.load(v_ptrs + layer).to(tl.pointer_type(DTYPE))
    offs = tl.arange(0, BLOCK_V)
    vmask = offs < V_ROW
    vals = tl.load(v_base + src * V_ROW + offs, mask=vmask)
    tl.store(v_base + dst * V_ROW + offs, vals, mask=vmask)


def _data_ptrs(buffers: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.tensor([b.data_ptr() for b in buffers], dtype=torch.uint64, device=device)


def _check_buffers(k_buffers: Sequence[torch.Tensor], v_buffers: Sequence[torch.Tensor]) -> None:
    if len(k_buffers) == 0 or len(k_buffers) != len(v_buffers):
        raise ValueError(f"need one K and one V buffer per layer, got {len(k_buffers)} and {len(v_buffers)}")
    k0, v0 = k_buffers[0], v_buffers[0]
    for name, bufs, ref in (("K", k_buffers, k0), ("V", v_buffers, v0)):
        for b in bufs:
            if b.shape != ref.shape or b.dtype != ref.dtype or b.device != ref.device or not b.is_contiguous():
                raise ValueError(
                    f"all {name} buffers must be contiguous with one shape/dtype/device; "
                    f"expected {tuple(ref.shape)} {ref.dtype} {ref.device}, got {tuple(b.shape)} {b.dtype} {b.device}"
                )
    if k0.dim() != 3 or v0.dim() != 3 or k0.shape[:2] != v0.shape[:2] or k0.dtype != v0.dtype:
        raise ValueError(f"expected K [slots, heads, d] and V [slots, heads, dv] of one dtype, got "
                         f"{tuple(k0.shape)} {k0.dtype} and {tuple(v0.shape)} {v0.dtype}")
    if k0.dtype not in _TL_DTYPES:
        raise ValueError(f"KV dtype {k0.dtype} not supported; use one of {list(_TL_DTYPES)}")


def copy_rotate_kv(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    delta: Union[int, torch.Tensor],
    inv_freq: torch.Tensor,
    k_ptrs: torch.Tensor | None = None,
    v_ptrs: torch.Tensor | None = None,
) -> None:
    """For every layer l: k_l[dst] = RoPE-rotate(k_l[src], delta); v_l[dst] = v_l[src]. One launch.

    k_buffers: L tensors [slots, heads, head_dim] (SGLang's `MHATokenToKVPool.k_buffer`, K after RoPE)
    v_buffers: L tensors [slots, heads, v_head_dim]
    src_slots, dst_slots: [N] integer slot indices (the image's cached slots, the request's new ones);
        dst slots must be distinct; src == dst rotates in place
    delta: int or [N] integer tensor, new start position minus cached start position (any sign)
    inv_freq: [rot_dim / 2] float32 rotary inverse frequencies; rot_dim <= head_dim, neox halves
    k_ptrs, v_ptrs: optional [L] uint64 data pointers (the pool's `k_data_ptrs`/`v_data_ptrs`), to
        skip building them per call
    """
    _check_buffers(k_buffers, v_buffers)
    n = src_slots.numel()
    if dst_slots.numel() != n:
        raise ValueError(f"src_slots and dst_slots differ in length: {n} vs {dst_slots.numel()}")
    if n == 0:
        return
    device = k_buffers[0].device
    num_layers = len(k_buffers)
    _, heads, head_dim = k_buffers[0].shape
    v_row = v_buffers[0].shape[1] * v_buffers[0].shape[2]
    rot_half = inv_freq.numel()
    if 2 * rot_half > head_dim:
        raise ValueError(f"rotary dim {2 * rot_half} exceeds head_dim {head_dim}")
    if not torch.is_tensor(delta):
        delta = torch.full((n,), int(delta), dtype=torch.int64, device=device)
    elif delta.numel() != n:
        raise ValueError(f"delta must be a scalar or have {n} entries, got {delta.numel()}")
    pass_dims = head_dim - 2 * rot_half
    _copy_rotate_kv_kernel[(n, num_layers)](
        k_ptrs if k_ptrs is not None else _data_ptrs(k_buffers, device),
        v_ptrs if v_ptrs is not None else _data_ptrs(v_buffers, device),
        src_slots.to(device=device, dtype=torch.int64).contiguous(),
        dst_slots.to(device=device, dtype=torch.int64).contiguous(),
        delta.to(device=device, dtype=torch.int64).contiguous(),
        inv_freq.to(device=device, dtype=torch.float32).contiguous(),
        NUM_HEADS=heads,
        HEAD_DIM=head_dim,
        V_ROW=v_row,
        ROT_HALF=rot_half,
        BLOCK_H=triton.next_power_of_2(heads),
        BLOCK_HALF=triton.next_power_of_2(max(rot_half, 1)),
        BLOCK_PASS=triton.next_power_of_2(max(pass_dims, 1)),
        BLOCK_V=triton.next_power_of_2(v_row),
        DTYPE=_TL_DTYPES[k_buffers[0].dtype],
    )


def copy_rotate_pool_kv(
    pool: Any, src_slots: torch.Tensor, dst_slots: torch.Tensor, delta: Union[int, torch.Tensor], inv_freq: torch.Tensor
) -> None:
    """copy_rotate_kv over an SGLang MHA KV pool (`k_buffer`/`v_buffer` lists, cached data pointers)."""
    copy_rotate_kv(pool.k_buffer, pool.v_buffer, src_slots, dst_slots, delta, inv_freq,
                   k_ptrs=getattr(pool, "k_data_ptrs", None), v_ptrs=getattr(pool, "v_data_ptrs", None))
