"""Test helper: SGLang's real KV pool on any device (a module, not conftest: conftest names clash
between test folders, so `from conftest import` is ambiguous)."""

import torch


def make_kv_pool(size: int, layers: int, heads: int, dim: int, device: str, seed: int = 0):
    """SGLang's real MHA KV pool (random contents) and token allocator, on `device`."""
    from sglang.srt.mem_cache.allocator.token import TokenToKVPoolAllocator
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    pool = MHATokenToKVPool(size=size, page_size=1, dtype=torch.float32, head_num=heads, head_dim=dim,
                            layer_num=layers, device=device, enable_memory_saver=False, enable_alt_stream=False)
    gen = torch.Generator().manual_seed(seed)
    for buf in (*pool.k_buffer, *pool.v_buffer):
        buf.copy_(torch.randn(buf.shape, generator=gen))
    return pool, TokenToKVPoolAllocator(size, torch.float32, device, pool, need_sort=False)
