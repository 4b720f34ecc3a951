"""Reused images in the chunked-prefill budget, with SGLang's real PrefillAdder, Req and pools (CPU)."""

from array import array

import pytest
import torch
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalInputs, Req
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.sampling.sampling_params import SamplingParams

from kv_pool import make_kv_pool
from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.prefill_budget import PrefillBudget, ReuseCharge, charge_ratio, reuse_charge
from vlcache_sglang.radix_mm_cache import ImageEntry, MultimodalRadixCache
from vlcache_sglang.reuse_planner import req_state

POOL, LAYERS = 1024, 2
KEY, GRID, N_IMG = 0x5EED, (1, 10, 48), 120  # 120 merged tokens
TEXT_BEFORE, TEXT_AFTER = 20, 10
RATIO = 6


@pytest.fixture
def make_cache(sglang_server_args):  # PrefillAdder reads SGLang's global server args
    def make(policy: str = "none", first_k: int = 8) -> MultimodalRadixCache:
        _, allocator = make_kv_pool(POOL, LAYERS, 2, 16, "cpu")
        req_pool = ReqToTokenPool(size=4, max_context_len=512, device="cpu", enable_memory_saver=False)
        params = CacheInitParams(disable=False, req_to_token_pool=req_pool, token_to_kv_pool_allocator=allocator,
                                 page_size=1)
        config = VLCacheConfig(enabled=True, policy=policy, first_k=first_k)
        return MultimodalRadixCache(params, config, max_store_tokens=400, num_layers=LAYERS,
                                    inv_freq=torch.ones(8))
    return make


def _store(cache: MultimodalRadixCache) -> object:
    src = cache.token_to_kv_pool_allocator.alloc(N_IMG)
    assert cache.store_image(ImageEntry(KEY, start_pos=5, grid_thw=GRID, num_tokens=N_IMG), src)
    cache.token_to_kv_pool_allocator.free(src)
    return cache.peek_image(KEY, GRID, N_IMG)


def _req(cache: MultimodalRadixCache, *, return_logprob: bool = False, logprob_start_len: int = -1) -> Req:
    """text, one image (pad tokens), text — a fresh request as the scheduler holds it."""
    pad = 1_000_000 + KEY % (1 << 30)
    ids = [*range(100, 100 + TEXT_BEFORE), *[pad] * N_IMG, *range(200, 200 + TEXT_AFTER)]
    item = MultimodalDataItem(modality=Modality.IMAGE, hash=KEY, pad_value=pad,
                              offsets=[(TEXT_BEFORE, TEXT_BEFORE + N_IMG - 1)],
                              model_specific_data={"image_grid_thw": torch.tensor([GRID])})
    params = SamplingParams(max_new_tokens=4)
    params.normalize(None)
    req = Req("r0", "", array("q", ids), params, return_logprob=return_logprob)
    req.logprob_start_len = logprob_start_len
    req.multimodal_inputs = MultimodalInputs(mm_items=[item])
    req.init_next_round_input(cache)
    return req


def _adder(cache: MultimodalRadixCache, chunk: int) -> PrefillAdder:
    return PrefillAdder(1, cache, cache.token_to_kv_pool_allocator, None, 0.0, rem_input_tokens=4 * chunk,
                        rem_chunk_tokens=chunk)


def _add(cache: MultimodalRadixCache, req: Req, adder: PrefillAdder, hooked: bool = True):
    if not hooked:
        return PrefillAdder.add_one_req(adder, req, has_chunked_req=False, truncation_align_size=None)
    return PrefillBudget(RATIO).around_add_one_req(PrefillAdder.add_one_req, adder, req, has_chunked_req=False,
                                                   truncation_align_size=None)


TOTAL = TEXT_BEFORE + N_IMG + TEXT_AFTER


def test_charge_ratio_of_qwen25_vl_7b():
    assert charge_ratio(hidden_size=3584, intermediate_size=18944) == 6
    assert charge_ratio(hidden_size=4096, intermediate_size=1) == 1, "never below one"


def test_cost_and_limit():
    charge = ReuseCharge(start=10, end=60, free_runs=((20, 50),), ratio=6)
    assert charge.cost(20) == 10
    assert charge.cost(26) == 11 and charge.cost(27) == 12  # 6 copied tokens cost 1, a 7th rounds up
    assert charge.cost(60) == 10 + 5 + 10
    for budget in range(0, 30):
        lim = charge.limit(budget)
        assert charge.cost(10 + lim) <= budget
        assert lim == 50 or charge.cost(10 + lim + 1) > budget, f"{budget=}: {lim=} is not the most that fits"


def test_stock_sglang_chunks_the_request(make_cache):
    cache = make_cache()
    _store(cache)
    req, adder = _req(cache), _adder(cache, chunk=64)
    assert _add(cache, req, adder, hooked=False) == AddReqResult.OTHER
    assert req.extend_range.end == 64 and adder.new_chunked_req is req


def test_a_reused_image_charges_one_sixth_so_the_request_runs_whole(make_cache):
    cache = make_cache()
    node = _store(cache)
    req, adder = _req(cache), _adder(cache, chunk=64)
    result = _add(cache, req, adder)
    cost = TEXT_BEFORE + TEXT_AFTER + N_IMG // RATIO  # 50
    assert (req.extend_range.start, req.extend_range.end) == (0, TOTAL)
    assert adder.new_chunked_req is None and adder.can_run_list == [req]
    assert adder.rem_chunk_tokens == 64 - cost and adder.rem_input_tokens == 4 * 64 - cost
    assert result == AddReqResult.CONTINUE
    assert node.lock_ref == 1 and req_state(req).locked == [node], "the batch's own allocation can't evict it"
    assert cache.evictable_size() == 0


def test_the_widened_budget_still_truncates_by_charge(make_cache):
    cache = make_cache()
    _store(cache)
    req, adder = _req(cache), _adder(cache, chunk=40)
    assert _add(cache, req, adder) == AddReqResult.OTHER
    # 20 text tokens + 120 image tokens at 1/6 = 40: the chunk ends right after the image
    assert req.extend_range.end == TEXT_BEFORE + N_IMG and adder.new_chunked_req is req
    assert adder.rem_chunk_tokens == 0
    # the next round continues through add_chunked_req: the tail has no image, so stock charging
    req.prefix_indices = torch.arange(req.extend_range.end)
    nxt = _adder(cache, chunk=40)
    left = PrefillBudget(RATIO).around_add_chunked_req(PrefillAdder.add_chunked_req, nxt, req)
    assert left is None and req.extend_range.end == TOTAL and nxt.rem_chunk_tokens == 40 - TEXT_AFTER


def test_a_request_continued_inside_the_image_keeps_its_credit(make_cache):
    cache = make_cache()
    _store(cache)
    req = _req(cache)
    req.prefix_indices = torch.arange(TEXT_BEFORE + 30)  # an earlier chunk ended 30 tokens into the image
    adder = _adder(cache, chunk=32)
    left = PrefillBudget(RATIO).around_add_chunked_req(PrefillAdder.add_chunked_req, adder, req)
    assert left is None and req.extend_range.end == TOTAL
    assert adder.rem_chunk_tokens == 32 - (TEXT_AFTER + 90 // RATIO)


def test_first_k_charges_the_recomputed_head_in_full(make_cache):
    cache = make_cache(policy="first_k", first_k=8)
    _store(cache)
    req, adder = _req(cache), _adder(cache, chunk=64)
    _add(cache, req, adder)
    assert req.extend_range.end == TOTAL
    assert adder.rem_chunk_tokens == 64 - (TEXT_BEFORE + TEXT_AFTER + 8 + -(-(N_IMG - 8) // RATIO))


def test_full_recompute_gets_no_credit(make_cache):
    cache = make_cache(policy="full")
    _store(cache)
    assert reuse_charge(_req(cache), cache, RATIO) is None


def test_unstored_image_and_input_logprobs_get_stock_charging(make_cache):
    cache = make_cache()
    assert reuse_charge(_req(cache), cache, RATIO) is None, "image not stored"
    _store(cache)
    assert reuse_charge(_req(cache, return_logprob=True, logprob_start_len=0), cache, RATIO) is None
    # OpenAI `logprobs`: output tokens only (SGLang sets the start past the prompt) -> credit
    assert reuse_charge(_req(cache, return_logprob=True, logprob_start_len=TOTAL), cache, RATIO) is not None


def test_a_request_that_does_not_fit_leaves_budgets_and_locks_alone(make_cache):
    cache = make_cache()
    node = _store(cache)
    # 20 free slots + the 120 evictable ones of the image node: short of the request's 150 + 4 + 1
    hog = cache.token_to_kv_pool_allocator.alloc(POOL - N_IMG - 20)
    req, adder = _req(cache), _adder(cache, chunk=64)
    assert _add(cache, req, adder) == AddReqResult.NO_TOKEN
    assert adder.rem_chunk_tokens == 64 and adder.rem_input_tokens == 4 * 64
    assert adder.can_run_list == [] and node.lock_ref == 0
    cache.token_to_kv_pool_allocator.free(hog)

