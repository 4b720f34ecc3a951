"""Torch reference of the copy-and-rotate kernel (and the rotation it applies)."""

from __future__ import annotations

from typing import Sequence

import torch


def rotate_neox(x: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Rotate neox-style (first half / second half) rotary dims of x by delta positions.

    x:        [n, heads, head_dim], any float dtype; dims >= 2 * len(inv_freq) pass through
    delta:    [n] integer positions to add
    inv_freq: [rot_dim / 2] float32, the model's rotary inverse frequencies
    Computes in float32 and returns x's dtype.
    """
    half = inv_freq.numel()
    ang = delta.to(torch.float32)[:, None] * inv_freq.to(torch.float32)[None, :]  # [n, half]
    cos, sin = ang.cos()[:, None, :], ang.sin()[:, None, :]
    xf = x.to(torch.float32)
    x1, x2, rest = xf[..., :half], xf[..., half : 2 * half], xf[..., 2 * half :]
    out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)
    return out.to(x.dtype)


def copy_rotate_kv_reference(
    k_buffers: Sequence[torch.Tensor],
    v_buffers: Sequence[torch.Tensor],
    src_slots: torch.Tensor,
    dst_slots: torch.Tensor,
    delta: torch.Tensor,
    inv_freq: torch.Tensor,
) -> None:
    """In-place: for every layer, k[dst] = rotate(k[src], delta); v[dst] = v[src]."""
    for k, v in zip(k_buffers, v_buffers):
        k[dst_slots] = rotate_neox(k[src_slots], delta, inv_freq)
        v[dst_slots] = v[src_slots]
