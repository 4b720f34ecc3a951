"""A compressed request's life in the vlcache cache, with SGLang's real RadixCache, pools and allocator
(CPU): capture -> trim after the last prefill chunk (images stored first, freed slots back to the
allocator, never inserted) -> release exactly the plan's slots on finish or retraction."""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalInputs
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from kv_pool import make_kv_pool
from vlcache_sglang.compression.compressor import VLCacheCompression
from vlcache_sglang.compression.runtime import CompressionRuntime
from vlcache_sglang.compression.step import PrefillView, is_kv_trimmed, trimmed_plan
from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.image_key import KEY_ATTR
from vlcache_sglang.kernels.attention_scores_reference import post_vision_scores_reference
from vlcache_sglang.radix_mm_cache import MultimodalRadixCache

POOL, LAYERS, KV, QO, DIM = 256, 3, 2, 4, 16
INV_FREQ = 1.0 / (1e6 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))
IMAGE_KEY, TEXT_BEFORE, N_IMG, TEXT_AFTER = 0xC0FFEE, 4, 40, 6
M = TEXT_BEFORE + N_IMG + TEXT_AFTER


def _cache(alpha, device):
    """On the GPU when there is one (the image store's copy kernel is real Triton there), else the CPU."""
    _, allocator = make_kv_pool(POOL, LAYERS, KV, DIM, device)
    req_pool = ReqToTokenPool(size=4, max_context_len=128, device=device, enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
                             page_size=1)
    config = VLCacheConfig(enabled=True, policy="none", compress_ratio=alpha)
    cache = MultimodalRadixCache(params, config, max_store_tokens=100, num_layers=LAYERS,
                                 inv_freq=INV_FREQ.to(device))
    cache.compression = CompressionRuntime(
        cache.policies.compression_for, LAYERS, req_pool.req_to_token.shape[0], device,
        build_step=lambda c: VLCacheCompression(c, scorer=post_vision_scores_reference), stats=cache.stats)
    return cache


class _Req(SimpleNamespace):
    def get_fill_ids(self):
        return self.full_untruncated_fill_ids[: self.extend_end]


def _request(cache, row=1, custom=None, extend_end=M):
    pad = 1_000_000 + IMAGE_KEY % (1 << 30)
    ids = list(range(100, 100 + TEXT_BEFORE)) + [pad] * N_IMG + list(range(200, 200 + TEXT_AFTER))
    item = MultimodalDataItem(modality=Modality.IMAGE, hash=IMAGE_KEY, pad_value=pad,
                              offsets=[(TEXT_BEFORE, TEXT_BEFORE + N_IMG - 1)],
                              model_specific_data={"image_grid_thw": torch.tensor([[1, 2, 2 * N_IMG]])})
    setattr(item, KEY_ATTR, IMAGE_KEY)
    mm = MultimodalInputs(mm_items=[item], mrope_positions=torch.arange(M).repeat(3, 1))  # (t, t, t): st = start
    slots = cache.token_to_kv_pool_allocator.alloc(M)
    cache.req_to_token_pool.req_to_token[row, :M] = slots.to(torch.int32)
    return _Req(rid=f"r{row}", multimodal_inputs=mm, req_pool_idx=row, origin_input_ids=ids, output_ids=[],
                full_untruncated_fill_ids=ids, extend_end=extend_end, extra_key=None, cache_protected_len=0,
                last_node=cache.root_node, prefix_indices=torch.empty(0), return_logprob=False,
                logprob_start_len=-1, return_hidden_states=False, cached_tokens=0, priority=0, session_id=None,
                sampling_params=SimpleNamespace(custom_params=custom))


def _prefill(cache, req, seed=0, prefix=0, reach_attention=True):
    """What the scheduler and the forward do: plan the capture before run_batch, then every layer's
    RadixAttention.forward sees its q (after RoPE). Returns the q of each layer."""
    runtime = cache.compression
    extend = req.extend_end - prefix
    batch = SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[req], prefix_lens=[prefix], extend_lens=[extend])
    runtime.before_run_batch(None, batch)
    fb = SimpleNamespace(forward_mode=ForwardMode.EXTEND, extend_prefix_lens_cpu=[prefix],
                         extend_seq_lens_cpu=[extend])
    gen = torch.Generator().manual_seed(seed)
    device = runtime.device
    qs = [(torch.randn(extend, QO * DIM, generator=gen) * (1 + 2 * layer)).to(device) for layer in range(LAYERS)]
    if reach_attention:
        for layer, q in enumerate(qs):
            attn = SimpleNamespace(layer_id=layer, tp_q_head_num=QO, head_dim=DIM, scaling=DIM ** -0.5)
            assert runtime.capture_attention(lambda *a, **k: "stock", attn, q, None, None, fb) == "stock"
    return qs


def _invariant(cache, held=0):
    alloc = cache.token_to_kv_pool_allocator
    total = alloc.available_size() + cache.evictable_size() + cache.protected_size() + held
    assert total == POOL, f"{alloc.available_size()=} {cache.evictable_size()=} {cache.protected_size()=} {held=}"


def test_a_compressed_request_is_trimmed_never_inserted_and_frees_exactly_its_plan(device):
    cache = _cache(alpha=0.2, device=device)
    req = _request(cache)
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    k0 = [k.clone() for k in pool.k_buffer]
    v0 = [v.clone() for v in pool.v_buffer]
    row = cache.req_to_token_pool.req_to_token[1].clone()
    qs = _prefill(cache, req)
    free_before = cache.token_to_kv_pool_allocator.available_size()
    cache.cache_unfinished_req(req)

    assert is_kv_trimmed(req)
    plan = trimmed_plan(req)
    # The image was stored from the whole KV, before the trim moved anything.
    node = cache.lookup_image(IMAGE_KEY, (1, 2, 2 * N_IMG), N_IMG)
    assert node is not None
    for layer in range(LAYERS):
        assert torch.equal(pool.k_buffer[layer][node.value], k0[layer][row[TEXT_BEFORE:TEXT_BEFORE + N_IMG].long()])
    # The trim is exactly what the step computes from the captured rows (the text after the image votes).
    positions = torch.arange(TEXT_BEFORE + N_IMG, M, device=device)
    step = VLCacheCompression(cache.config.compression, scorer=post_vision_scores_reference)
    want = step.run(PrefillView(1, M, 0, cache.req_to_token_pool.req_to_token.clone(), [k.clone() for k in k0],
                                [v.clone() for v in v0], positions,
                                [q[positions].reshape(-1, QO, DIM) for q in qs], DIM ** -0.5)).plan
    assert [k.tolist() for k in plan.kept_positions] == [k.tolist() for k in want.kept_positions]
    assert plan.free_slots.tolist() == want.free_slots.tolist() and plan.free_slots.numel() > 0
    for layer in range(LAYERS):  # each layer's table reads that layer's kept tokens' KV
        kept = plan.kept_positions[layer]
        assert torch.equal(pool.k_buffer[layer][plan.kv_indices[layer]], k0[layer][row[kept].long()])
    # Freed slots are back in the allocator (the image node took N_IMG); nothing of the request entered the tree.
    assert cache.token_to_kv_pool_allocator.available_size() == free_before - N_IMG + plan.free_slots.numel()
    assert cache.evictable_size() == N_IMG  # the image node only
    assert cache.compression.live_trimmed == 1
    assert cache.compression.kept.kept_lens[1].tolist() == plan.table_lengths
    assert cache.compression.kept.prompt_lens[1].item() == M

    # Two decode tokens, then the request finishes: its retained and decode slots are freed, once.
    decode = cache.token_to_kv_pool_allocator.alloc(2)
    cache.req_to_token_pool.req_to_token[1, M:M + 2] = decode.to(torch.int32)
    cache.cache_finished_req(req, kv_len_to_handle=M + 2)
    assert not is_kv_trimmed(req) and cache.compression.live_trimmed == 0
    assert cache.compression.kept.kept_lens[1].tolist() == [0] * LAYERS
    assert cache.evictable_size() == N_IMG  # still only the image node: the request was not inserted
    _invariant(cache)
    stats = cache.compression.stats
    assert stats.compressed_requests == 1
    assert stats.compress_freed_slots == plan.free_slots.numel()
    # The kept share served: each layer's kept prompt tokens over L·m (at alpha 0.2 above alpha: the
    # voters after the image are always kept).
    assert stats.compress_kept_token_layers == sum(k.numel() for k in want.kept_positions)
    assert stats.compress_prompt_token_layers == LAYERS * M
    assert 0.2 <= stats.compress_kept_fraction < 1.0


def test_retraction_frees_the_plan_and_the_request_may_be_trimmed_again(device):
    cache = _cache(alpha=0.2, device=device)
    req = _request(cache)
    _prefill(cache, req)
    cache.cache_unfinished_req(req)
    assert is_kv_trimmed(req)
    cache.cache_finished_req(req, is_insert=False, kv_len_to_handle=M)  # SGLang's retract path
    _invariant(cache)
    # Re-prefilled in full later (SGLang re-allocates its slots), it is trimmed again.
    req = _request(cache)
    _prefill(cache, req, seed=1)
    cache.cache_unfinished_req(req)
    assert is_kv_trimmed(req)
    cache.cache_finished_req(req, kv_len_to_handle=M)
    _invariant(cache)


@pytest.mark.parametrize("how", ["alpha_one_server", "alpha_one_request", "not_captured"])
def test_uncompressed_requests_take_sglangs_own_path(how, device):
    cache = _cache(alpha=1.0 if how == "alpha_one_server" else 0.2, device=device)
    custom = {"vlcache": {"compress_ratio": 1.0}} if how == "alpha_one_request" else None
    req = _request(cache, custom=custom)
    _prefill(cache, req, reach_attention=how != "not_captured")  # a reuse batch never calls RadixAttention
    cache.cache_unfinished_req(req)
    assert not is_kv_trimmed(req) and cache.compression.live_trimmed == 0
    assert cache.evictable_size() == N_IMG  # the image node; the prompt is locked by the request:
    assert cache.protected_size() == M and req.cache_protected_len == M  # inserted as stock does
    assert cache.compression.stats.compress_not_captured == (how == "not_captured")
    cache.cache_finished_req(req, kv_len_to_handle=M)
    _invariant(cache)


def test_chunks_of_a_compressed_request_stay_out_of_the_tree_and_the_last_one_trims(device):
    cache = _cache(alpha=0.2, device=device)
    req = _request(cache, extend_end=24)
    runtime = cache.compression
    runtime.before_run_batch(None, SimpleNamespace(forward_mode=ForwardMode.EXTEND, reqs=[req], prefix_lens=[0],
                                                   extend_lens=[24]))
    assert runtime.pending is None  # not its last chunk: no capture
    cache.cache_unfinished_req(req, chunked=True)
    assert cache.evictable_size() == 0 and cache.protected_size() == 0  # not in the tree (no image yet)
    assert req.prefix_indices.tolist() == cache.req_to_token_pool.req_to_token[1, :24].tolist()
    assert req.cache_protected_len == 0 and req.last_node is cache.root_node
    req.extend_end = M
    _prefill(cache, req, prefix=24)
    cache.cache_unfinished_req(req)
    assert is_kv_trimmed(req)
    assert trimmed_plan(req).shared_prefix_len == 0  # the earlier chunk is the request's own, so compressible
    cache.cache_finished_req(req, kv_len_to_handle=M)
    _invariant(cache)
