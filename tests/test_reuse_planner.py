"""Reuse planning and image storing with SGLang's real pools and multimodal input objects (CPU)."""

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalInputs
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool

from kv_pool import make_kv_pool
from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.kernels import rotate_neox
from vlcache_sglang.radix_mm_cache import MultimodalRadixCache
from vlcache_sglang.image_key import KEY_ATTR
from vlcache_sglang.reuse_planner import plan_request

POOL, LAYERS, HEADS, DIM = 512, 2, 2, 16
INV_FREQ = 1.0 / (1e6 ** (torch.arange(0, DIM, 2, dtype=torch.float32) / DIM))
IMAGE_KEY, GRID = 0x5EED, (1, 4, 12)  # 12 merged tokens
N_IMG = 12


@pytest.fixture
def cache(device):
    """On the GPU when there is one (the copy kernel is real Triton there), else on the CPU."""
    _, allocator = make_kv_pool(POOL, LAYERS, HEADS, DIM, device)
    req_pool = ReqToTokenPool(size=4, max_context_len=256, device=device, enable_memory_saver=False)
    params = CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
                             page_size=1)
    return MultimodalRadixCache(params, VLCacheConfig(enabled=True, policy="first_k", first_k=2),
                                max_store_tokens=200, num_layers=LAYERS, inv_freq=INV_FREQ.to(device))


def _request(cache, text_before: int, text_after: int, row: int, extra_key=None):
    """A prefilled request: text, one image (pad tokens), text; slots allocated and written."""
    pad = 1_000_000 + IMAGE_KEY % (1 << 30)
    ids = list(range(100, 100 + text_before)) + [pad] * N_IMG + list(range(200, 200 + text_after))
    start = text_before
    item = MultimodalDataItem(modality=Modality.IMAGE, hash=IMAGE_KEY, pad_value=pad,
                              offsets=[(start, start + N_IMG - 1)],
                              model_specific_data={"image_grid_thw": torch.tensor([GRID])})
    setattr(item, KEY_ATTR, IMAGE_KEY)  # keyed by our tokenizer hook
    # Qwen2.5-VL M-RoPE: text t -> (t, t, t); image -> (0, h, w) + start; text after continues at max + 1.
    pos = [[t] * 3 for t in range(start)]
    pos += [[start, start + h, start + w] for h in range(2) for w in range(6)]
    nxt = start + 6
    pos += [[nxt + i] * 3 for i in range(text_after)]
    mm = MultimodalInputs(mm_items=[item], mrope_positions=torch.tensor(pos).T.contiguous())
    slots = cache.token_to_kv_pool_allocator.alloc(len(ids))
    cache.req_to_token_pool.req_to_token[row, : len(ids)] = slots.to(torch.int32)
    return SimpleNamespace(
        rid=f"r{row}", multimodal_inputs=mm, req_pool_idx=row, origin_input_ids=ids, output_ids=[],
        extra_key=extra_key, cache_protected_len=0, last_node=cache.root_node, prefix_indices=torch.empty(0),
        return_logprob=False, logprob_start_len=-1, return_hidden_states=False, cached_tokens=0, priority=0, session_id=None, get_fill_ids=lambda: ids,
    ), slots


def test_a_computed_image_is_stored_when_its_request_is_cached(cache):
    req, slots = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(req)
    assert cache.has_image(IMAGE_KEY)
    node = cache.lookup_image(IMAGE_KEY, GRID, N_IMG)
    assert node.vl_entry.start_pos == 5
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    assert torch.equal(pool.k_buffer[1][node.value], pool.k_buffer[1][slots[5:17]])


def test_plan_reuses_the_stored_image_at_a_new_position(cache):
    first, first_slots = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    node = cache.lookup_image(IMAGE_KEY, GRID, N_IMG)
    second, second_slots = _request(cache, text_before=9, text_after=4, row=1)
    seq_len = len(second.origin_input_ids)
    plan = plan_request(second, 0, seq_len, second_slots, cache, cache.policy, LAYERS)
    assert plan is not None and plan.reused_tokens == N_IMG
    assert plan.src_slots.tolist() == node.value.tolist()
    assert plan.dst_slots.tolist() == second_slots[9:21].tolist()
    assert set(plan.delta.tolist()) == {9 - 5}
    # first_k=2: text (9 + 4 tokens) and the image's first 2 tokens at every layer
    assert plan.selector.sets[0].tolist() == [*range(0, 11), *range(21, 25)]
    assert node.lock_ref == 1, "locked until the request is cached"
    # the model forward copies with δ; K at the new slots is the stored K rotated by δ
    cache.copy_kv(plan.src_slots, plan.dst_slots, plan.delta)
    pool = cache.token_to_kv_pool_allocator.get_kvcache()
    want = rotate_neox(pool.k_buffer[0][node.value], plan.delta, INV_FREQ.to(plan.delta.device))
    torch.testing.assert_close(pool.k_buffer[0][second_slots[9:21]], want)
    cache.cache_unfinished_req(second)
    assert node.lock_ref == 0, "released once cached"
    assert cache.stats.stored_images == 1, "a reused image is never stored again"


def test_chunk_boundaries_and_prefix_clip_the_reused_span(cache):
    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    # chunk 1 ends inside the image at token 15: tokens [9, 15) of the image are reused
    plan = plan_request(second, 0, 15, slots[:15], cache, cache.policy, LAYERS)
    assert plan.layout.reused_tokens().tolist() == list(range(9, 15))
    # chunk 2 continues from 15: the rest of the image, source offset 6
    plan2 = plan_request(second, 15, len(second.origin_input_ids), slots[15:], cache, cache.policy, LAYERS)
    node = cache.lookup_image(IMAGE_KEY, GRID, N_IMG)
    assert plan2.src_slots.tolist() == node.value[6:].tolist()
    assert cache.stats.key_hits == 2, "an image split by chunked prefill is one lookup (plus the test's)"


def test_mismatched_grid_is_a_miss(cache):
    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    second.multimodal_inputs.mm_items[0].model_specific_data["image_grid_thw"] = torch.tensor([[1, 6, 8]])
    assert plan_request(second, 0, len(second.origin_input_ids), slots, cache, cache.policy, LAYERS) is None
    assert cache.stats.key_mismatches == 1


@pytest.mark.parametrize("return_logprob, logprob_start, reused", [
    (False, -1, True),
    (True, -1, True),  # token_ids_logprob only: no input-token logprobs -> reuse
    (True, "len", True),  # OpenAI `logprobs`: output tokens only (SGLang sets the start to L) -> reuse
    (True, "len-1", False),  # the last prompt token's input logprob: not planned (nor charged)
    (True, 0, False),  # input-token logprobs need every token's hidden state -> no reuse
])
def test_plan_batch_attaches_plans_and_counts_cached_tokens(cache, return_logprob, logprob_start, reused):
    from vlcache_sglang.reuse_planner import PLANS_ATTR, plan_batch

    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    extend = len(second.origin_input_ids)
    second.return_logprob = return_logprob
    second.logprob_start_len = {"len": extend, "len-1": extend - 1}.get(logprob_start, logprob_start)
    batch = SimpleNamespace(reqs=[second], prefix_lens=[0], extend_lens=[extend], out_cache_loc=slots)
    plan_batch(batch, cache)
    plans = getattr(second.multimodal_inputs, PLANS_ATTR, {})
    assert (0 in plans) == reused
    # first_k=2 recomputes 2 of the 12 reused image tokens: 10 count as cached
    assert second.cached_tokens == (10 if reused else 0)
    assert cache.stats.reused_tokens == (12 if reused else 0)
    assert cache.stats.recomputed_tokens == (2 if reused else 0)


def test_a_request_override_picks_its_own_policy_and_outcomes_reach_the_stats(cache):
    from vlcache_sglang.reuse_planner import PLANS_ATTR, plan_batch

    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    second.sampling_params = SimpleNamespace(custom_params={"vlcache": {"policy": "full"}})
    extend = len(second.origin_input_ids)
    batch = SimpleNamespace(reqs=[second], prefix_lens=[0], extend_lens=[extend], out_cache_loc=slots,
                            extend_logprob_start_lens=None)
    plan_batch(batch, cache)
    plan = getattr(second.multimodal_inputs, PLANS_ATTR)[0]
    assert plan.selector.policy.name == "full", "the server runs first_k; this request asked for full"
    assert second.cached_tokens == 0, "full recomputes every reused token: none is served from cache"
    plan.report(plan.selector.outcome())  # what the forward does once every layer is decided
    assert cache.stats.reused_token_layers == 12 * LAYERS == cache.stats.recomputed_token_layers
    assert cache.stats.recomputed_fraction == 1.0
    assert cache.policy_for(second) is cache.policy_for(second), "one policy object per distinct override"


def _two_images(cache, row: int, second_key: int):
    """text(3), the stored image, text(2), a new image (same grid, another key), text(2)."""
    req, _ = _request(cache, text_before=3, text_after=2 + N_IMG + 2, row=row)
    pad2 = 1_000_000 + second_key % (1 << 30)
    start2 = 3 + N_IMG + 2
    req.origin_input_ids[start2:start2 + N_IMG] = [pad2] * N_IMG
    mm = req.multimodal_inputs
    item = MultimodalDataItem(modality=Modality.IMAGE, hash=second_key, pad_value=pad2,
                              offsets=[(start2, start2 + N_IMG - 1)],
                              model_specific_data={"image_grid_thw": torch.tensor([GRID])})
    setattr(item, KEY_ATTR, second_key)
    mm.mm_items.append(item)
    # M-RoPE of the second image: (st, st + h, st + w) with st its first token's text position.
    st = int(mm.mrope_positions[0, start2])
    grid = torch.tensor([[st, st + h, st + w] for h in range(2) for w in range(6)]).T
    mm.mrope_positions[:, start2:start2 + N_IMG] = grid
    return req


@pytest.mark.parametrize("policy, stored", [("first_k", False), ("full", True)])
def test_an_image_computed_after_an_approximately_reused_one_is_not_stored(cache, policy, stored):
    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    req = _two_images(cache, row=1, second_key=0xB0B)
    req.sampling_params = SimpleNamespace(custom_params={"vlcache": {"policy": policy}})
    slots = cache.req_to_token_pool.req_to_token[1, : len(req.origin_input_ids)].long()
    plan = plan_request(req, 0, len(req.origin_input_ids), slots, cache, cache.policy_for(req), LAYERS)
    assert plan is not None and plan.reused_tokens == N_IMG
    cache.cache_unfinished_req(req)
    assert cache.has_image(0xB0B) == stored, "its KV attended to approximate KV of the first image"
    assert cache.stats.second_generation_skipped == (0 if stored else 1)
def _plan_batch_of(cache, req, slots):
    from vlcache_sglang.reuse_planner import PLANS_ATTR, plan_batch

    extend = len(req.origin_input_ids)
    plan_batch(SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[extend], out_cache_loc=slots), cache)
    return getattr(req.multimodal_inputs, PLANS_ATTR, {}).get(0)


@pytest.mark.parametrize("first_salt, second_salt, reused", [
    (None, None, True), ("tenant-a", "tenant-a", True),
    ("tenant-a", "tenant-b", False), ("tenant-a", None, False), (None, "tenant-b", False),
    ("tenant-a", "tenant-alora-1", False),  # Req.extra_key = cache_salt ‖ extra_key ‖ LoRA id
])
def test_the_image_store_is_namespaced_by_extra_key(cache, first_salt, second_salt, reused):
    first, _ = _request(cache, text_before=5, text_after=3, row=0, extra_key=first_salt)
    cache.cache_unfinished_req(first)
    assert cache.has_image(IMAGE_KEY, first_salt) and not cache.has_image(IMAGE_KEY, "someone else")
    second, slots = _request(cache, text_before=9, text_after=4, row=1, extra_key=second_salt)
    plan = _plan_batch_of(cache, second, slots)
    assert (plan is not None) == reused
    assert second.cached_tokens == (10 if reused else 0), "cached_tokens tells no tenant about another's images"
    assert cache.stats.key_hits == (1 if reused else 0)
    if not reused:  # the other tenant computes the image itself, and gets a node of its own
        cache.cache_unfinished_req(second)
        assert cache.has_image(IMAGE_KEY, second_salt) and cache.has_image(IMAGE_KEY, first_salt)


def test_items_not_keyed_by_our_hook_are_never_reused_or_stored(cache):
    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    setattr(second.multimodal_inputs.mm_items[0], KEY_ATTR, None)  # e.g. a client's mm_hashes replaced the hash
    assert _plan_batch_of(cache, second, slots) is None and second.cached_tokens == 0
    cache.cache_unfinished_req(second)
    assert cache.stats.stored_images == 1


def test_return_hidden_states_is_not_reused(cache):
    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    second.return_hidden_states = True  # skipped tokens would have no hidden state
    assert _plan_batch_of(cache, second, slots) is None and second.cached_tokens == 0


@pytest.mark.parametrize("damage", ["no_grid", "grid_2d", "no_positions", "positions_not_st", "positions_short"])
def test_unusual_items_are_counted_misses_not_exceptions(cache, damage):
    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    mm, item = second.multimodal_inputs, second.multimodal_inputs.mm_items[0]
    if damage == "no_grid":
        del item.model_specific_data["image_grid_thw"]
    elif damage == "grid_2d":
        item.model_specific_data["image_grid_thw"] = torch.tensor([[4, 12]])
    elif damage == "no_positions":
        mm.mrope_positions = None
    elif damage == "positions_not_st":
        mm.mrope_positions[1, 9] += 1
    else:
        mm.mrope_positions = mm.mrope_positions[:, :5]
    assert _plan_batch_of(cache, second, slots) is None
    assert cache.stats.key_mismatches == 1
    cache.cache_unfinished_req(second)  # storing skips what it cannot place
    assert cache.stats.stored_images == 1


@pytest.mark.parametrize("is_insert", [True, False], ids=["aborted-after-its-forward", "retracted"])
def test_a_request_that_ends_early_releases_its_image_lock_and_leaves_the_pool_whole(cache, is_insert):
    """A client that goes away during prefill (issue 12, item 7): SGLang finishes the request as aborted
    after the forward it was in (cache_finished_req) or retracts it (is_insert=False); either way the
    image node the planner locked is unlocked, the request stores nothing again, and SGLang's idle
    invariant (free + evictable + protected = pool) holds once both requests are gone."""
    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_finished_req(first, kv_len_to_handle=len(first.origin_input_ids))
    node = cache.lookup_image(IMAGE_KEY, GRID, N_IMG)
    assert node is not None and node.lock_ref == 0
    second, second_slots = _request(cache, text_before=9, text_after=4, row=1)
    n = len(second.origin_input_ids)
    assert plan_request(second, 0, n, second_slots, cache, cache.policy, LAYERS) is not None
    assert node.lock_ref == 1
    cache.cache_finished_req(second, is_insert=is_insert, kv_len_to_handle=n)
    assert node.lock_ref == 0 and cache.protected_size() == 0
    assert cache.stats.stored_images == 1
    alloc = cache.token_to_kv_pool_allocator
    assert alloc.available_size() + cache.evictable_size() == POOL, (alloc.available_size(), cache.evictable_size())


def test_a_probe_that_recomputes_an_image_whole_takes_it_out_of_cached_tokens(cache):
    """plan_batch counts S_0 before the forward; a probe's S_0 is its sample, and its replan may
    recompute the image whole: the report after the forward corrects cached_tokens and the stats."""
    from vlcache_sglang.recompute_policy import LayerObservation
    from vlcache_sglang.reuse_planner import PLANS_ATTR, plan_batch

    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    second.sampling_params = SimpleNamespace(custom_params={"vlcache": {
        "policy": "image_bounded", "check_sample": 0.25, "error_bound": 0.0, "recompute_ratio": 0.05}})
    extend = len(second.origin_input_ids)
    batch = SimpleNamespace(reqs=[second], prefix_lens=[0], extend_lens=[extend], out_cache_loc=slots,
                            extend_logprob_start_lens=None)
    plan_batch(batch, cache)
    plan = getattr(second.multimodal_inputs, PLANS_ATTR)[0]
    sel = plan.selector
    assert sel.probing and second.cached_tokens == 12 - 3, "the sample: every 4th of 12 tokens (the floor among them)"
    tokens = sel.candidates(1)
    fresh = torch.ones(tokens.numel(), 4)
    sel.observe(1, LayerObservation(tokens, fresh, fresh * 2, fresh, fresh * 2))  # relative error 1 > 0
    assert sel.replanned
    plan.report(sel.outcome())
    assert second.cached_tokens == 0, "the image was recomputed whole: nothing served from cache"
    assert cache.stats.recomputed_tokens == 12
    assert cache.stats.recomputed_token_layers == 3 + 3 + 12 * LAYERS, "the probe's two layers, then the plan"


def test_a_retracted_request_counts_its_reuse_once_and_starts_its_state_over(cache):
    """SGLang retracts a decoding request under memory pressure (`reset_for_retract`: retraction_count
    + 1, retracted_stain) and prefills it again: cached_tokens counts once, as SGLang's own count, and
    what the first prefill reused does not keep an image out of the store."""
    from vlcache_sglang.reuse_planner import plan_batch, req_state

    first, _ = _request(cache, text_before=5, text_after=3, row=0)
    cache.cache_unfinished_req(first)
    second, slots = _request(cache, text_before=9, text_after=4, row=1)
    extend = len(second.origin_input_ids)
    batch = SimpleNamespace(reqs=[second], prefix_lens=[0], extend_lens=[extend], out_cache_loc=slots)
    plan_batch(batch, cache)
    assert second.cached_tokens == 10 and req_state(second).reused_keys == {IMAGE_KEY}
    cache._after_prefill(second, kv_len=extend)  # the forward ran; its locks are released
    second.retraction_count, second.retracted_stain = 1, True  # what reset_for_retract sets
    assert req_state(second).reused_keys == set() and req_state(second).retractions == 1
    plan_batch(batch, cache)
    assert second.cached_tokens == 10, "counted once, as SGLang counts its own"
    assert cache.stats.reused_tokens == 24, "the stats count the work done: both prefills reused"
