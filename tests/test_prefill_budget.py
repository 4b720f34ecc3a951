"""Reused images in the chunked-prefill budget, with SGLang's real PrefillAdder, Req and pools (CPU)."""

from array import array
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.managers.schedule_batch import Modality, MultimodalDataItem, MultimodalInputs, Req
from sglang.srt.managers.schedule_policy import AddReqResult, PrefillAdder
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.memory_pool import ReqToTokenPool
from sglang.srt.sampling.sampling_params import SamplingParams

from kv_pool import make_kv_pool
from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.image_key import KEY_ATTR
from vlcache_sglang.prefill_budget import PrefillBudget, ReuseCharge, charge_ratio, reuse_charge
from vlcache_sglang.radix_mm_cache import ImageEntry, MultimodalRadixCache
from vlcache_sglang.reuse_planner import PLANS_ATTR, plan_batch, req_state

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


def _mrope_positions() -> torch.Tensor:
    """Qwen2.5-VL M-RoPE: text t -> (t, t, t); the image (0, h, w) + start; text after continues."""
    h_n, w_n = GRID[1] // 2, GRID[2] // 2
    pos = [[t] * 3 for t in range(TEXT_BEFORE)]
    pos += [[TEXT_BEFORE, TEXT_BEFORE + h, TEXT_BEFORE + w] for h in range(h_n) for w in range(w_n)]
    nxt = TEXT_BEFORE + max(h_n, w_n)
    pos += [[nxt + i] * 3 for i in range(TEXT_AFTER)]
    return torch.tensor(pos).T.contiguous()


def _req(cache: MultimodalRadixCache, *, return_logprob: bool = False, logprob_start_len: int = -1,
         return_hidden_states: bool = False, extra_key=None) -> Req:
    """text, one image (pad tokens), text — a fresh request as the scheduler holds it."""
    pad = 1_000_000 + KEY % (1 << 30)
    ids = [*range(100, 100 + TEXT_BEFORE), *[pad] * N_IMG, *range(200, 200 + TEXT_AFTER)]
    item = MultimodalDataItem(modality=Modality.IMAGE, hash=KEY, pad_value=pad,
                              offsets=[(TEXT_BEFORE, TEXT_BEFORE + N_IMG - 1)],
                              model_specific_data={"image_grid_thw": torch.tensor([GRID])})
    setattr(item, KEY_ATTR, KEY)  # keyed by our tokenizer hook
    params = SamplingParams(max_new_tokens=4)
    params.normalize(None)
    req = Req("r0", "", array("q", ids), params, return_logprob=return_logprob,
              return_hidden_states=return_hidden_states, extra_key=extra_key)
    req.logprob_start_len = logprob_start_len
    req.multimodal_inputs = MultimodalInputs(mm_items=[item], mrope_positions=_mrope_positions())
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



@pytest.mark.parametrize("policy", ["none", "first_k"])
@pytest.mark.parametrize("case", [
    dict(), dict(return_logprob=True, logprob_start_len=-1), dict(return_logprob=True, logprob_start_len=0),
    dict(return_logprob=True, logprob_start_len=TOTAL - 1), dict(return_logprob=True, logprob_start_len=TOTAL),
    dict(return_hidden_states=True), dict(extra_key="another-tenant"),
])
def test_the_charge_is_what_the_planner_plans(make_cache, policy, case):
    """Admission and planning answer "is this image reused" with one predicate: a request charged
    as reused is planned as reused, token for token, and one charged in full is planned in full."""
    cache = make_cache(policy=policy, first_k=8)
    _store(cache)
    req = _req(cache, **case)
    charge = reuse_charge(req, cache, RATIO)
    slots = cache.token_to_kv_pool_allocator.alloc(TOTAL)
    batch = SimpleNamespace(reqs=[req], prefix_lens=[0], extend_lens=[TOTAL], out_cache_loc=slots)
    plan_batch(batch, cache)
    plan = getattr(req.multimodal_inputs, PLANS_ATTR, {}).get(0)
    assert (charge is None) == (plan is None), f"{case}: charged {charge}, planned {plan}"
    if plan is not None:
        free = sum(b - a for a, b in charge.free_runs)
        assert free == req.cached_tokens == plan.reused_tokens - int(plan.layout.is_reused(plan.selector.sets[0]).sum())
    expect_reuse = case in (dict(), dict(return_logprob=True, logprob_start_len=-1),
                            dict(return_logprob=True, logprob_start_len=TOTAL))
    assert (plan is not None) == expect_reuse
