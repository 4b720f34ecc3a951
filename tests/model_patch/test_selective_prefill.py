"""Batch-level token sets of the selective prefill, from per-request plans (CPU)."""

from types import SimpleNamespace

import torch

from vlcache_sglang.layer_selector import LayerSelector
from vlcache_sglang.model_patch.selective_prefill import SelectiveBatch
from vlcache_sglang.recompute_policy import ImageSpan, PolicyParams, TokenLayout, get_recompute_policy
from vlcache_sglang.reuse_planner import RequestReuse


def _plan(layout, policy, layers):
    empty = torch.empty(0, dtype=torch.long)
    return RequestReuse(layout.prefix_len, layout.seq_len, layout, LayerSelector(policy, layout, layers), empty,
                        empty, empty)


def _all_rows(sel):
    return [sel.layer(layer)[0] for layer in range(sel.num_layers)]


def test_rows_index_the_extend_axis_and_requests_without_plans_compute_everything():
    layers = 3
    layout = TokenLayout(seq_len=30, prefix_len=4, images=(ImageSpan(10, 12, reused=True),))
    plan = _plan(layout, get_recompute_policy("first_k", PolicyParams(first_k=2)), layers)
    fb = SimpleNamespace(extend_prefix_lens_cpu=[4, 0], extend_seq_lens_cpu=[26, 5],
                         req_pool_indices=torch.tensor([6, 2]), out_cache_loc=torch.zeros(31, dtype=torch.long))
    sel = SelectiveBatch([plan, None], fb, layers)
    assert sel.num_extend_tokens == 31 and sel.single_set
    # request 0: extend rows 0..25 are tokens 4..29; tokens 12..21 (reused, past first_k) are skipped
    want0 = [t - 4 for t in [*range(4, 12), *range(22, 30)]]
    want1 = [26 + i for i in range(5)]
    rows = _all_rows(sel)
    assert rows[0].tolist() == want0 + want1
    assert [sel.changed(i) for i in range(3)] == [True, False, False] and all(r is rows[0] for r in rows), "one set: built once"
    runs = sel.layer(0)[1]
    assert runs.req_rows.tolist() == [6, 6, 2]
    assert runs.run_start.tolist() == [4, 22, 0] and runs.run_len.tolist() == [8, 8, 5]


def test_a_shrinking_policy_gets_new_rows_only_where_the_set_changes():
    class Halving(type(get_recompute_policy("full"))):
        name = "test_halving"
        same_set_every_layer = False

        def _choose(self, layout, layer, num_layers, candidates, observation):
            return candidates[: max(0, candidates.numel() >> layer)]

    layout = TokenLayout(seq_len=20, prefix_len=0, images=(ImageSpan(2, 8, reused=True),))
    plan = _plan(layout, Halving(), 4)
    fb = SimpleNamespace(extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[20], req_pool_indices=torch.tensor([0]),
                         out_cache_loc=torch.zeros(20, dtype=torch.long))
    sel = SelectiveBatch([plan], fb, 4)
    rows = _all_rows(sel)
    sizes = [r.numel() for r in rows]
    assert sizes == [20, 16, 13, 12]  # 12 text tokens + 8, 4, 1, 0 of the image
    assert not sel.single_set and [sel.changed(i) for i in range(4)] == [True] * 4
    for prev, cur in zip(rows, rows[1:]):
        assert bool(torch.isin(cur, prev).all())


def test_reused_kv_of_a_batch_is_copied_and_rotated_in_one_call(device):
    from kv_pool import make_kv_pool
    from vlcache_sglang.kernels import rotate_neox
    from vlcache_sglang.model_patch.selective_prefill import copy_reused_kv

    pool, _ = make_kv_pool(64, 2, 2, 16, device)
    inv_freq = (1.0 / (1e6 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))).to(device)
    empty = torch.empty(0, dtype=torch.long)
    layout = TokenLayout(seq_len=8, prefix_len=0, images=(ImageSpan(1, 3, reused=True),))

    def plan(src, dst, delta):
        t = lambda x: torch.tensor(x, device=device)  # noqa: E731
        selector = LayerSelector(get_recompute_policy("none"), layout, 1)
        return RequestReuse(0, 8, layout, selector, t(src), t(dst), t([delta] * len(src)))

    plans = [plan([1, 2, 3], [20, 21, 22], 5), None, plan([4, 5], [30, 31], -2)]
    want_k = [rotate_neox(pool.k_buffer[0][[1, 2, 3]], torch.full((3,), 5, device=device), inv_freq),
              rotate_neox(pool.k_buffer[0][[4, 5]], torch.full((2,), -2, device=device), inv_freq)]
    copy_reused_kv(pool, plans, inv_freq)
    torch.testing.assert_close(pool.k_buffer[0][[20, 21, 22]], want_k[0])
    torch.testing.assert_close(pool.k_buffer[0][[30, 31]], want_k[1])
    assert torch.equal(pool.v_buffer[1][[30, 31]], pool.v_buffer[1][[4, 5]])


def test_plans_are_taken_by_prefix_length_once():
    from vlcache_sglang.model_patch.selective_prefill import _take_plans
    from vlcache_sglang.reuse_planner import PLANS_ATTR

    layout = TokenLayout(seq_len=8, prefix_len=0, images=(ImageSpan(1, 3, reused=True),))
    empty = torch.empty(0, dtype=torch.long)
    selector = LayerSelector(get_recompute_policy("none"), layout, 1)
    mm = SimpleNamespace(**{PLANS_ATTR: {0: RequestReuse(0, 8, layout, selector, empty, empty, empty)}})
    extend = SimpleNamespace(is_extend=lambda: True)
    fb = SimpleNamespace(mm_inputs=[mm, None], forward_mode=extend, extend_prefix_lens_cpu=[4, 0])
    assert _take_plans(fb) is None, "a plan made for another chunk (prefix 0) is not used at prefix 4"
    fb.extend_prefix_lens_cpu = [0, 0]
    plans = _take_plans(fb)
    assert plans[0] is not None and plans[1] is None
    assert _take_plans(fb) is None, "taken once"


def test_a_chunk_inside_a_reused_image_computes_nothing_under_none(monkeypatch):
    """A 4K image's tokens span whole prefill chunks: S_0 is empty and no kernel may be launched."""
    from types import SimpleNamespace as NS

    from sglang.srt.model_executor import forward_context

    from vlcache_sglang.model_patch.selective_prefill import SelectivePrefill

    monkeypatch.setattr(forward_context, "get_token_to_kv_pool", lambda: None)
    monkeypatch.setattr(forward_context, "get_req_to_token_pool", lambda: NS(req_to_token=None))
    layout = TokenLayout(seq_len=8192, prefix_len=4096, images=(ImageSpan(4096, 4096, reused=True, offset_in_image=100),))
    plan = _plan(layout, get_recompute_policy("none"), 2)
    fb = SimpleNamespace(extend_prefix_lens_cpu=[4096], extend_seq_lens_cpu=[4096], req_pool_indices=torch.tensor([1]),
                         out_cache_loc=torch.zeros(4096, dtype=torch.long))
    sel = SelectiveBatch([plan], fb, 2)
    assert sel.layer(0)[0].numel() == 0

    def never(*args, **kwargs):
        raise AssertionError("no layer may run for an empty token set")

    lm = NS(embed_tokens=lambda ids: torch.ones(ids.numel(), 8), start_layer=0, end_layer=2, layers=[never, never],
            norm=never)
    out = SelectivePrefill(torch.ones(4))._selective_forward(lm, torch.zeros(4096, dtype=torch.long),
                                                            torch.zeros(3, 4096, dtype=torch.long), fb, None, sel)
    assert out.shape == (4096, 8) and not out.any()


def test_per_layer_write_slots_send_what_a_layer_drops_to_slot_0():
    """The graph path's [L, |S_0|] write slots: a token's own slot where S_l holds it, else slot 0;
    an unchanged layer (here 2 after 1) gets the same row as the one before it."""
    layout = TokenLayout(seq_len=20, prefix_len=0, images=(ImageSpan(2, 10, reused=True),))
    plan = _plan(layout, get_recompute_policy("vlcache", PolicyParams(layer_ratios=(0.5, 0.2, 0.2, 0.0))), 4)
    fb = SimpleNamespace(extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[20], req_pool_indices=torch.tensor([0]),
                         out_cache_loc=100 + torch.arange(20))
    sel = SelectiveBatch([plan], fb, 4)
    assert sel.static_plan and not sel.single_set and not sel.changed(2)
    rows0 = sel.layer(0)[0]
    loc = sel.layer_out_loc(fb.out_cache_loc[rows0])
    assert loc.shape == (4, rows0.numel())
    for layer in range(4):
        kept = set(sel.layer(layer)[0].tolist())
        want = [100 + r if r in kept else 0 for r in rows0.tolist()]
        assert loc[layer].tolist() == want, layer
    assert loc[1].tolist() == loc[2].tolist() and bool((loc[0] > 0).all())
    assert int((loc[1] == 0).sum()) > 0, "layer 1 drops reused tokens: the check can fail"
