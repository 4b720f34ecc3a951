"""Batch-level token sets of the selective prefill, from per-request plans (CPU)."""

from types import SimpleNamespace

import torch

from vlcache_sglang.model_patch.selective_prefill import build_selective_batch
from vlcache_sglang.recompute_policy import ImageSpan, PolicyParams, TokenLayout, get_recompute_policy
from vlcache_sglang.reuse_planner import RequestReuse


def _plan(layout, policy, layers):
    empty = torch.empty(0, dtype=torch.long)
    return RequestReuse(layout.prefix_len, layout.seq_len, layout, policy.plan(layout, layers), empty, empty, empty)


def test_rows_index_the_extend_axis_and_requests_without_plans_compute_everything():
    layers = 3
    layout = TokenLayout(seq_len=30, prefix_len=4, images=(ImageSpan(10, 12, reused=True),))
    plan = _plan(layout, get_recompute_policy("first_k", PolicyParams(first_k=2)), layers)
    fb = SimpleNamespace(extend_prefix_lens_cpu=[4, 0], extend_seq_lens_cpu=[26, 5],
                         req_pool_indices=torch.tensor([6, 2]), out_cache_loc=torch.zeros(31, dtype=torch.long))
    sel = build_selective_batch([plan, None], fb, layers)
    assert sel.num_extend_tokens == 31
    # request 0: extend rows 0..25 are tokens 4..29; tokens 12..21 (reused, past first_k) are skipped
    want0 = [t - 4 for t in [*range(4, 12), *range(22, 30)]]
    want1 = [26 + i for i in range(5)]
    assert sel.layer_rows[0].tolist() == want0 + want1
    assert all(rows is sel.layer_rows[0] for rows in sel.layer_rows), "one set: planned once, reused"
    runs = sel.layer_runs[0]
    assert runs.req_rows.tolist() == [6, 6, 2]
    assert runs.run_start.tolist() == [4, 22, 0] and runs.run_len.tolist() == [8, 8, 5]


def test_a_shrinking_policy_gets_new_rows_only_where_the_set_changes():
    class Halving(type(get_recompute_policy("full"))):
        name = "test_halving"

        def _choose(self, layout, layer, num_layers, candidates, observation):
            return candidates[: max(0, candidates.numel() >> layer)]

    layout = TokenLayout(seq_len=20, prefix_len=0, images=(ImageSpan(2, 8, reused=True),))
    plan = _plan(layout, Halving(), 4)
    fb = SimpleNamespace(extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[20], req_pool_indices=torch.tensor([0]),
                         out_cache_loc=torch.zeros(20, dtype=torch.long))
    sel = build_selective_batch([plan], fb, 4)
    sizes = [rows.numel() for rows in sel.layer_rows]
    assert sizes == [20, 16, 13, 12]  # 12 text tokens + 8, 4, 1, 0 of the image
    for prev, cur in zip(sel.layer_rows, sel.layer_rows[1:]):
        assert bool(torch.isin(cur, prev).all())
