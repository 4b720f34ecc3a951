"""The per-layer seam of the decoder loop, on the small stand-in model of test_selective_graph.

An observing policy (cacheblend) must see, at its check layer and before anything is written, the
K/V that layer computed for the reused tokens of S_{l-1} and the cached K/V in their slots; the
tokens it keeps get fresh K/V from there on, the rest keep their cached K/V. Given the same
decisions, the observing loop must compute exactly what a static plan of those sets computes.
"""

from __future__ import annotations

from types import SimpleNamespace as NS

import pytest
import torch
from test_selective_graph import HIDDEN, LAYERS, Pool, make_model

from vlcache_sglang.layer_selector import LayerSelector
from vlcache_sglang.model_patch import selective_attention
from vlcache_sglang.model_patch.selective_graph import SelectiveGraphs
from vlcache_sglang.model_patch.selective_prefill import SelectiveBatch, SelectivePrefill
from vlcache_sglang.recompute_policy import ImageSpan, PolicyParams, RecomputePolicy, TokenLayout, get_recompute_policy
from vlcache_sglang.reuse_planner import RequestReuse

SEQ, IMAGE = 24, ImageSpan(4, 16, reused=True)
LAYOUT = TokenLayout(seq_len=SEQ, prefix_len=0, images=(IMAGE,))


class FixedSets(RecomputePolicy):
    """A static policy replaying given sets (what the observing run decided)."""

    name = "test_fixed_sets"

    def __init__(self, sets):
        super().__init__(PolicyParams())
        self._sets = sets

    def budget(self, layout, layer, num_layers):
        return 10**9

    def _choose(self, layout, layer, num_layers, candidates, observation):
        return candidates[torch.isin(candidates, self._sets[layer])]


@pytest.fixture
def run_batch(device, monkeypatch):
    """run_batch(policies, pool, rows) -> (final hidden states, selectors): one request per policy (the
    same layout; request row r has its own embeddings and slots) in one _selective_forward."""
    from sglang.srt.model_executor import forward_context

    monkeypatch.setattr(selective_attention, "choose_backend", lambda *a, **k: "triton")
    torch.manual_seed(1)
    lm = make_model(device)
    embeds = [torch.randn(SEQ, HIDDEN, device=device) for _ in range(2)]
    req_to_token = torch.zeros(2, 64, dtype=torch.int32, device=device)
    slots = [torch.arange(10 + 40 * r, 10 + 40 * r + SEQ, device=device) for r in range(2)]
    for r, s in enumerate(slots):
        req_to_token[r, :SEQ] = s.to(torch.int32)
    pos = torch.arange(SEQ)
    one_positions = torch.stack([pos, pos // 3, pos % 5]).to(device)

    def go(policies, pool, rows=(0, 1)):
        monkeypatch.setattr(forward_context, "get_token_to_kv_pool", lambda: pool)
        monkeypatch.setattr(forward_context, "get_req_to_token_pool", lambda: NS(req_to_token=req_to_token))
        n = len(rows)
        fb = NS(extend_prefix_lens_cpu=[0] * n, extend_seq_lens_cpu=[SEQ] * n,
                req_pool_indices=torch.tensor(list(rows)), out_cache_loc=torch.cat([slots[r] for r in rows]))
        empty = torch.empty(0, dtype=torch.long)
        plans = [RequestReuse(r, SEQ, LAYOUT, LayerSelector(p, LAYOUT, LAYERS), empty, empty, empty)
                 for r, p in zip(rows, policies)]
        sel = SelectiveBatch(plans, fb, LAYERS)
        prefill = SelectivePrefill(torch.ones(4))
        prefill._graphs = SelectiveGraphs(why_not=lambda *args: "these tests run the eager loop")
        out = prefill._selective_forward(lm, None, one_positions.repeat(1, n), fb,
                                         torch.cat([embeds[r] for r in rows]), sel)
        return out, [p.selector for p in plans]

    return go, slots


@pytest.fixture
def run(run_batch):
    """run(policy, pool) -> (final hidden states, selector): one request (row 0) through _selective_forward."""
    go_batch, slots = run_batch

    def go(policy, pool):
        out, (selector,) = go_batch([policy], pool, rows=(0,))
        return out, selector

    return go, slots[0]


def _fresh_pool(device):
    torch.manual_seed(7)  # the "cached" K/V: what a copy-rotate would have put into the slots
    return Pool(device)


def test_an_observing_policy_sees_fresh_and_cached_kv_and_matches_a_static_plan_of_its_choice(run, device):
    go, slots = run
    seen = []
    blend = get_recompute_policy("cacheblend", PolicyParams(recompute_ratio=0.25, check_layer=1))
    keep = blend._keep
    blend._keep = lambda layout, candidates, obs: seen.append(obs) or keep(layout, candidates, obs)
    cached = _fresh_pool(device)
    pool = _fresh_pool(device)
    out, selector = go(blend, pool)

    (obs,) = seen
    reused_slots = slots[IMAGE.start:IMAGE.end]
    assert obs.tokens.tolist() == list(range(IMAGE.start, IMAGE.end)), "all reused tokens of S_0"
    torch.testing.assert_close(obs.k_cached, cached.k_buffer[1][reused_slots].reshape(16, -1))
    # Layer 0 computed every token under cacheblend, as under full: the fresh layer-1 K is full's.
    full_pool = _fresh_pool(device)
    go(get_recompute_policy("full"), full_pool)
    torch.testing.assert_close(obs.k_fresh, full_pool.k_buffer[1][reused_slots].reshape(16, -1))
    torch.testing.assert_close(obs.v_fresh, full_pool.v_buffer[1][reused_slots].reshape(16, -1))

    kept = selector.sets[1][LAYOUT.is_reused(selector.sets[1])]
    assert kept.numel() == 4 and selector.sets[2] is selector.sets[1]
    dropped = torch.tensor([t for t in range(IMAGE.start, IMAGE.end) if t not in kept.tolist()])
    for layer in (1, 2):  # the dropped tokens keep their cached K/V, the kept ones get fresh K/V
        torch.testing.assert_close(pool.k_buffer[layer][slots[dropped]], cached.k_buffer[layer][slots[dropped]])
        assert not torch.equal(pool.k_buffer[layer][slots[kept]], cached.k_buffer[layer][slots[kept]])

    static_pool = _fresh_pool(device)
    static_out, _ = go(FixedSets(list(selector.sets)), static_pool)
    last = SEQ - 1
    torch.testing.assert_close(out[last], static_out[last])
    for layer in range(LAYERS):
        torch.testing.assert_close(pool.k_buffer[layer], static_pool.k_buffer[layer])
        torch.testing.assert_close(pool.v_buffer[layer], static_pool.v_buffer[layer])

    outcome = selector.outcome()  # QKV of all 16 reused tokens at layers 0 and 1, of 4 at layer 2
    assert outcome.computed_token_layers == 16 + 16 + 4


def test_a_shrinking_static_plan_runs_the_eager_loop_like_nested_fixed_sets(run, device):
    go, slots = run
    policy = get_recompute_policy("vlcache", PolicyParams(layer_ratios=(1.0, 0.5, 0.125)))
    pool = _fresh_pool(device)
    out, selector = go(policy, pool)
    sizes = [int(LAYOUT.is_reused(s).sum()) for s in selector.sets]
    assert sizes == [16, 8, 2] and not selector.layer_invariant
    cached = _fresh_pool(device)
    for layer, n in enumerate(sizes):  # the image's tail beyond its layer's head keeps the cached K
        tail = slots[IMAGE.start + n:IMAGE.end]
        torch.testing.assert_close(pool.k_buffer[layer][tail], cached.k_buffer[layer][tail])
    full_out, _ = go(get_recompute_policy("full"), _fresh_pool(device))
    assert not torch.allclose(out[SEQ - 1], full_out[SEQ - 1]), "reused KV that differs must change the answer"
    ratio_one, _ = go(get_recompute_policy("cacheblend", PolicyParams(recompute_ratio=1.0)), _fresh_pool(device))
    torch.testing.assert_close(ratio_one[SEQ - 1], full_out[SEQ - 1])


@pytest.mark.parametrize("bound", [0.0, 1e9], ids=["beyond-the-bound", "within-it"])
def test_a_probe_starts_the_loop_over_with_its_plan(run, device, bound):
    """image_bounded with a 1/4 sample: the check measures the sample, the loop starts over with the
    replanned sets. Beyond the bound: `full`'s output and pools. Within it: what a static plan of the
    probe's layer-0 set, then the floor, computes (the sample keeps the layer-0 K/V the probe wrote)."""
    go, slots = run
    probe = get_recompute_policy("image_bounded", PolicyParams(recompute_ratio=0.05, error_bound=bound,
                                                               check_sample=0.25))
    pool = _fresh_pool(device)
    out, selector = go(probe, pool)
    assert selector.replanned and selector.layer_invariant
    if bound == 0.0:
        want_pool = _fresh_pool(device)
        want, _ = go(get_recompute_policy("full"), want_pool)
        assert selector.sets[0].tolist() == list(range(SEQ)), "the image recomputed whole"
    else:
        sample = LAYOUT.base_tokens().tolist() + [4, 8, 12, 16]  # the floor (4) and every 4th token
        floor = torch.tensor(sorted(LAYOUT.base_tokens().tolist() + [4]))
        assert torch.equal(selector.sets[0], floor)
        want_pool = _fresh_pool(device)
        want, _ = go(FixedSets([torch.tensor(sorted(sample)), floor, floor]), want_pool)
    torch.testing.assert_close(out[SEQ - 1], want[SEQ - 1])
    for layer in range(LAYERS):
        torch.testing.assert_close(pool.k_buffer[layer], want_pool.k_buffer[layer])
        torch.testing.assert_close(pool.v_buffer[layer], want_pool.v_buffer[layer])
    # the probe's sample (4 tokens) at layer 0 and its QKV at the check layer, then the plan
    assert selector.outcome().computed_token_layers == 4 + 4 + (16 if bound == 0.0 else 1) * LAYERS


def test_a_probe_restarts_the_loop_without_changing_its_batchmate(run_batch, device):
    """A probing request next to a static one: the restart reruns the batchmate's first layers, which
    must leave its output and its K/V exactly as when it runs alone (and the probe's as alone)."""
    go, slots = run_batch
    probe = get_recompute_policy("image_bounded", PolicyParams(recompute_ratio=0.05, error_bound=0.0,
                                                               check_sample=0.25))
    mate = get_recompute_policy("first_k", PolicyParams(first_k=3))
    pool = _fresh_pool(device)
    out, (probe_sel, mate_sel) = go([probe, mate], pool)
    assert probe_sel.replanned and mate_sel.layer_invariant
    alone_probe, alone_mate = _fresh_pool(device), _fresh_pool(device)
    want_probe, _ = go([probe], alone_probe, rows=(0,))
    want_mate, _ = go([mate], alone_mate, rows=(1,))
    torch.testing.assert_close(out[SEQ - 1], want_probe[SEQ - 1])
    torch.testing.assert_close(out[2 * SEQ - 1], want_mate[SEQ - 1])
    for layer in range(LAYERS):
        for got, want, s in ((pool, alone_probe, slots[0]), (pool, alone_mate, slots[1])):
            torch.testing.assert_close(got.k_buffer[layer][s], want.k_buffer[layer][s])
            torch.testing.assert_close(got.v_buffer[layer][s], want.v_buffer[layer][s])
    assert mate_sel.outcome().computed_token_layers == 3 * LAYERS, "the rerun is not charged to the batchmate"
