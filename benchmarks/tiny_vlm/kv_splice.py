"""Simulate image-KV reuse in plain transformers: the image tokens' K/V of every text layer come from
another request (same image, different text before it).

Forward hooks on each layer's k_proj / v_proj record their outputs at the image positions in a
"source" run and overwrite them in a "target" run. When both requests put the image at the same
positions (equal-length text before it), the pre-RoPE K at the same position is exactly the post-RoPE
K the server would copy and re-rotate by 0, so this is the server's `none` policy. Keeping the first k
image tokens fresh is `first_k`: with causal attention they only see the target's own text and earlier
fresh image tokens, so they are what full recomputation gives, as in the server. An image token's
own hidden state reaches later tokens only through its K/V, so overwriting K/V in every layer is enough.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from vlcache_sglang.calibrate import kv_projection_hooks


def _image_index(image_start: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch index, position) of every image token, [B * n_tokens] each."""
    b = torch.arange(len(image_start), device=image_start.device).repeat_interleave(n_tokens)
    pos = (image_start[:, None] + torch.arange(n_tokens, device=image_start.device)).flatten()
    return b, pos


@contextlib.contextmanager
def record_image_kv(model: torch.nn.Module, image_start: torch.Tensor, n_tokens: int,
                    store: dict[tuple[int, str], torch.Tensor]) -> Iterator[None]:
    """During the block, store[(layer, 'k'|'v')] = that projection's output at the image tokens,
    [B, n_tokens, kv_dim]."""
    b, pos = _image_index(image_start, n_tokens)

    def hook(layer: int, which: str):
        def fn(_module, _inputs, output):
            store[(layer, which)] = output[b, pos].reshape(len(image_start), n_tokens, -1).detach()
        return fn

    with kv_projection_hooks(model, hook):
        yield


@contextlib.contextmanager
def splice_image_kv(model: torch.nn.Module, image_start: torch.Tensor, n_tokens: int,
                    store: dict[tuple[int, str], torch.Tensor], keep_first: int = 0) -> Iterator[None]:
    """During the block, image tokens keep_first.. of every layer take their K/V from `store`
    (recorded with the same image_start); the first keep_first stay freshly computed."""
    if not 0 <= keep_first <= n_tokens:
        raise ValueError(f"keep_first must be in 0..{n_tokens}, got {keep_first}")
    reused = n_tokens - keep_first
    b, pos = _image_index(image_start + keep_first, reused)

    def hook(layer: int, which: str):
        def fn(_module, _inputs, output):
            src = store[(layer, which)][:, keep_first:]
            if src.shape[0] != len(image_start):
                raise ValueError(f"stored K/V is for {src.shape[0]} requests, this batch has {len(image_start)}")
            output = output.clone()
            output[b, pos] = src.reshape(-1, src.shape[-1]).to(output.dtype)
            return output
        return fn

    with kv_projection_hooks(model, hook):
        yield
