"""MultimodalRadixCache on the CPU, with SGLang's real RadixCache, KV pool and token allocator."""

from array import array

import pytest
import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams, MatchPrefixParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixKey

from kv_pool import make_kv_pool
from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.kernels import rotate_neox
from vlcache_sglang.radix_mm_cache import ImageEntry, MultimodalRadixCache

POOL, LAYERS, HEADS, DIM = 256, 3, 2, 16
INV_FREQ = 1.0 / (1e6 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))


@pytest.fixture
def cache(device):
    """On the GPU when there is one (the copy kernel is real Triton there), else on the CPU."""
    _, allocator = make_kv_pool(POOL, LAYERS, HEADS, DIM, device)
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator, page_size=1)
    return MultimodalRadixCache(params, VLCacheConfig(enabled=True, policy="none"), max_store_tokens=100,
                                num_layers=LAYERS, inv_freq=INV_FREQ.to(device))


def _invariant(cache) -> None:
    """SGLang's idle check: available + evictable + protected == total."""
    alloc = cache.token_to_kv_pool_allocator
    total = alloc.available_size() + cache.evictable_size() + cache.protected_size()
    assert total == POOL, f"{alloc.available_size()=} {cache.evictable_size()=} {cache.protected_size()=}"


def _entry(key, n, start=10):
    return ImageEntry(image_key=key, start_pos=start, grid_thw=(1, 2, 2 * n), num_tokens=n)


def _request_kv(cache, n):
    """n slots as a finished request would hold them (allocated, KV written)."""
    return cache.token_to_kv_pool_allocator.alloc(n)


def _store(cache, key, n) -> bool:
    """A request computes an image, the cache stores it, the request's slots are freed."""
    src = _request_kv(cache, n)
    stored = cache.store_image(_entry(key, n), src)
    cache.token_to_kv_pool_allocator.free(src)
    return stored


def test_store_copies_kv_and_keeps_the_invariant(cache):
    src = _request_kv(cache, 20)
    assert cache.store_image(_entry(0xABC, 20), src)
    cache.token_to_kv_pool_allocator.free(src)  # the request ends; the node owns its own copy
    _invariant(cache)
    node = cache.lookup_image(0xABC, (1, 2, 40), 20)
    assert node is not None and len(node.value) == 20
    assert not set(node.value.tolist()) & set(src.tolist())
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    for layer in range(LAYERS):
        assert torch.equal(pool.k_buffer[layer][node.value], pool.k_buffer[layer][src])
        assert torch.equal(pool.v_buffer[layer][node.value], pool.v_buffer[layer][src])
    assert cache.image_store_tokens == 20 and cache.stats.store_bytes == 20 * LAYERS * 2 * HEADS * DIM * 4
    assert not cache.store_image(_entry(0xABC, 20), src), "stored once"


def test_lookup_hit_miss_and_mismatch_are_counted(cache):
    _store(cache, 7, 12)
    assert cache.lookup_image(7, (1, 2, 24), 12) is not None
    assert cache.lookup_image(8, (1, 2, 24), 12) is None
    assert cache.lookup_image(7, (1, 4, 12), 12) is None, "grid differs: a miss, never a wrong reuse"
    assert cache.lookup_image(7, (1, 2, 24), 13) is None, "token count differs"
    s = cache.stats
    assert (s.key_hits, s.key_misses, s.key_mismatches) == (1, 1, 2)


def test_image_nodes_never_match_a_prefix(cache):
    n = 8
    src = _request_kv(cache, n)
    cache.store_image(_entry(5, n), src)
    cache.token_to_kv_pool_allocator.free(src)
    pad = 1_000_000 + 5
    match = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [pad] * n))))
    assert len(match.device_indices) == 0
    # and ordinary prefix caching still works next to them, zero copy
    slots = _request_kv(cache, 6)
    cache.insert(InsertParams(key=RadixKey(array("q", [1, 2, 3, 4, 5, 6])), value=slots))
    m = cache.match_prefix(MatchPrefixParams(key=RadixKey(array("q", [1, 2, 3, 4, 9]))))
    assert m.device_indices.tolist() == slots[:4].tolist()
    _invariant(cache)


def test_locked_image_nodes_survive_eviction(cache):
    _store(cache, 1, 30)
    _store(cache, 2, 30)
    node1 = cache.lookup_image(1, (1, 2, 60), 30)
    cache.inc_lock_ref(node1)
    assert cache.protected_size() == 30
    _invariant(cache)
    cache.evict(EvictParams(num_tokens=1000))
    assert cache.has_image(1) and not cache.has_image(2)
    assert cache.stats.evicted_images == 1
    cache.dec_lock_ref(node1)
    cache.evict(EvictParams(num_tokens=1000))
    assert not cache.has_image(1) and cache.image_store_tokens == 0
    _invariant(cache)


def _invariant_with_requests(cache, held):
    alloc = cache.token_to_kv_pool_allocator
    assert alloc.available_size() + cache.evictable_size() + cache.protected_size() + held == POOL


def test_store_bound_evicts_least_recently_used_first(cache):
    for key in (1, 2, 3):  # 3 x 30 tokens = 90 <= bound 100
        _store(cache, key, 30)
    cache.lookup_image(1, (1, 2, 60), 30)  # 1 is now more recent than 2
    removed = []
    cache._record_remove_event = lambda node, medium=None: removed.append(node)  # SGLang's KV-event hook
    two = cache._image_nodes[(None, 2)]
    assert _store(cache, 4, 30)
    assert removed == [two], "the evicted image node is reported as RadixCache.evict reports its nodes"
    assert [cache.has_image(k) for k in (1, 2, 3, 4)] == [True, False, True, True]
    assert cache.image_store_tokens == 90
    assert not _store(cache, 5, 101), "larger than the bound"
    _invariant(cache)
    assert cache.stats.store_skipped == 1


@pytest.mark.parametrize("policy, evicted", [("lru", 1), ("lfu", 2)])
def test_store_bound_evicts_in_the_servers_eviction_order(device, policy, evicted):
    """--radix-eviction-policy ranks image nodes as it ranks tree leaves: a hit counts for LFU."""
    _, allocator = make_kv_pool(POOL, LAYERS, HEADS, DIM, device)
    params = CacheInitParams(disable=False, req_to_token_pool=None, token_to_kv_pool_allocator=allocator,
                             page_size=1, eviction_policy=policy)
    cache = MultimodalRadixCache(params, VLCacheConfig(enabled=True, policy="none"), max_store_tokens=100,
                                 num_layers=LAYERS, inv_freq=INV_FREQ.to(device))
    for key in (1, 2, 3):
        _store(cache, key, 30)
    for key in (1, 1, 3, 3, 2):  # 2 is the most recent, and the least often used
        cache.lookup_image(key, (1, 2, 60), 30)
    assert _store(cache, 4, 30)
    assert [k for k in (1, 2, 3) if not cache.has_image(k)] == [evicted]


def test_store_under_memory_pressure_evicts_the_tree_or_skips(cache):
    alloc = cache.token_to_kv_pool_allocator
    held = alloc.alloc(alloc.available_size() - 10)  # running requests hold nearly everything
    prefix_slots = alloc.alloc(10)
    cache.insert(InsertParams(key=RadixKey(array("q", list(range(10)))), value=prefix_slots))
    src = held[:8]
    assert cache.store_image(_entry(9, 8), src), "evicts the unlocked prefix to make room"
    assert cache.store_image(_entry(10, 8), held[8:16]), "memory pressure evicts the older image node"
    assert not cache.has_image(9) and cache.has_image(10)
    cache.inc_lock_ref(cache.lookup_image(10, (1, 2, 16), 8))
    assert not cache.store_image(_entry(11, 8), held[16:24]), "nothing unlocked left to evict"
    assert cache.stats.store_skipped == 1
    _invariant_with_requests(cache, held=len(held))


def test_flush_clears_image_nodes(cache):
    _store(cache, 3, 10)
    cache.reset()
    cache.token_to_kv_pool_allocator.clear()
    assert not cache.has_image(3) and cache.image_store_tokens == 0
    _invariant(cache)


def test_copy_kv_from_an_image_node_rotates_k_by_delta(cache):
    src = _request_kv(cache, 16)
    cache.store_image(_entry(11, 16), src)
    node = cache.lookup_image(11, (1, 2, 32), 16)
    dst = _request_kv(cache, 10)
    cache.copy_kv(node.value[3:13], dst, delta=-7)
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    for layer in range(LAYERS):
        want = rotate_neox(pool.k_buffer[layer][node.value[3:13]], torch.full((10,), -7, device=dst.device),
                           INV_FREQ.to(dst.device))
        torch.testing.assert_close(pool.k_buffer[layer][dst], want, rtol=1e-5, atol=1e-5)
        assert torch.equal(pool.v_buffer[layer][dst], pool.v_buffer[layer][node.value[3:13]])
