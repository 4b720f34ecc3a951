"""The vlcache decoder loop against SGLang's own Qwen2 decoder on a small real model (CPU, fp32).

`selective_layers.selective_layer` is a copy of `Qwen2DecoderLayer.forward` + `Qwen2Attention.forward`
with attention swapped for SelectiveAttention. These tests run both on the same batch of a real
SGLang `Qwen2Model` (standin.py: 2 layers, hidden 64, 4 q / 2 kv heads of 16, M-RoPE [2, 3, 3]) with
SGLang's real KV pool and req_to_token pool; one request has a cached prefix in the pool, one not.

Reference (chosen over a plain-torch re-implementation): SGLang's own `Qwen2Model.forward` /
`Qwen2DecoderLayer.forward`, i.e. its RadixAttention going to the `torch_native` attention backend
(SDPA over each request's req_to_token row, cached prefix included) with a real EXTEND ForwardBatch,
published through SGLang's forward context. torch_native because it is SGLang's one attention
backend that runs on a CPU, and it is cheap to stand up (it needs only the two pools). So the
reference is the stock code path, not our reading of it: any drift of the copy from SGLang's
layer (op order, norms, residuals, rotary, the K/V written to the pool) shows up as a mismatch. For a shrinking active
set the reference still runs SGLang's layers over every token, with the pool's set_kv_buffer
masked so that at layer l only the tokens of S_l write their K/V (the others keep the pool's,
as after a reuse copy); tokens outside S_l then only feed garbage into their own rows, which are
not compared.

vlcache side: `SelectivePrefill.around_lm_forward` (the hook on Qwen2Model.forward) with the
batch's SelectiveBatch from `build_selective_batch`; on CPU the attention is the Triton scattered
kernel under TRITON_INTERPRET=1 (conftest), forced because SelectiveAttention's choice looks only at
run shapes and would pick FlashInfer, which needs a GPU.

What these tests cannot see, because the copy ignores it and the stand-in leaves it inert:
RadixAttention's k_scale/v_scale (an fp8 KV cache with checkpoint scales), `layers_to_capture`
(EAGLE3) and pipeline parallelism (setup_checks refuses speculative decoding and PP); tensor
parallelism has its own two-rank test (test_tensor_parallel.py).
`forward_batch` to the MLP is no difference: SGLang's Qwen2DecoderLayer calls `self.mlp(h)` too.
"""

from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional, Sequence

import pytest
import torch

from standin import RequestSpec, StandIn, build_standin

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the stand-in is on the CPU: the Triton kernel needs TRITON_INTERPRET=1 there")

ATOL = RTOL = 1e-5
# One request with a cached 8-token prefix (text) and a 4x4 image after it, one fresh request
# with a 3x4 image: 22 + 18 extend tokens.
PREFIXED = RequestSpec(30, prefix_len=8, images=((12, 4, 4),))
FRESH = RequestSpec(18, images=((3, 3, 4),))


# ---- the vlcache side, in one place (adapt here when the per-layer policy seam lands) ------------

class _FixedSelector:
    """A LayerSelector's face for given sets: every layer decided, `changed` by size (sets are nested)."""

    def __init__(self, sets: Sequence[torch.Tensor]) -> None:
        self.sets = list(sets)
        self.changed = [True] + [b.numel() != a.numel() for a, b in zip(self.sets, self.sets[1:])]
        self.layer_invariant = not any(self.changed[1:])
        self.probing = False  # a fixed plan: nothing to probe
        self.charged_first_set = False

    def ready(self, layer: int) -> bool:
        return True

    def charge_first_set(self) -> None:
        self.charged_first_set = True


def vlcache_forward(standin: StandIn, batch, sets: Sequence[Optional[Sequence[torch.Tensor]]],
                    prefill=None) -> tuple[torch.Tensor, object]:
    """The vlcache decoder loop over `batch`: sets[i][l] is S_l of request i (absolute token indices,
    a list over layers; the same object at consecutive layers when unchanged), or None for a request
    without a plan (every token at every layer). Returns the [n, hidden] output and the prefill."""
    plans = [None if s is None else SimpleNamespace(selector=_FixedSelector(s), report=None) for s in sets]
    return run_plans(standin, batch, plans, prefill)


def run_plans(standin: StandIn, batch, plans: list, prefill=None) -> tuple[torch.Tensor, object]:
    """The vlcache decoder loop (the hook on Qwen2Model.forward) over `batch` with these plans (each
    with a `selector`, or None: every token at every layer)."""
    from sglang.srt.models.qwen2 import Qwen2Model

    from vlcache_sglang.model_patch.selective_prefill import SELECTIVE_ATTR, SelectiveBatch, SelectivePrefill

    prefill = prefill if prefill is not None else SelectivePrefill(standin.inv_freq)
    prefill.test_selectors = [p.selector for p in plans if p is not None]  # what the tests inspect after
    fb = batch.forward_batch
    # As the server's path builds it (SelectivePrefill's own sum over TP ranks for observations).
    setattr(fb, SELECTIVE_ATTR, SelectiveBatch(plans, fb, standin.num_layers, prefill._sum_ranks))
    try:
        with standin.forward_context():
            out = prefill.around_lm_forward(Qwen2Model.forward, standin.lm, batch.input_ids, batch.positions, fb)
    finally:
        setattr(fb, SELECTIVE_ATTR, None)
    return out, prefill


def policy_sets(spec: RequestSpec, name: str, num_layers: int, **params) -> list[torch.Tensor]:
    """S_0..S_{L-1} of a request whose images are all reused, from the real recompute policy."""
    from vlcache_sglang.recompute_policy import PolicyParams, get_recompute_policy

    return get_recompute_policy(name, PolicyParams(**params)).plan(spec.token_layout(), num_layers)


def stock_reference(standin: StandIn, batch, layer_sets=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """SGLang's own forward of `batch` (StandIn.stock_forward) and the K/V pools it leaves, with the
    pools then put back as they were, for the vlcache side to run on the same state."""
    before = standin.snapshot_kv()
    want = standin.stock_forward(batch, layer_sets)
    want_pool = standin.snapshot_kv()
    standin.restore_kv(before)
    return want, want_pool


def assert_pools_equal(got: list[torch.Tensor], want: list[torch.Tensor], skip_slots=()) -> None:
    for i, (g, w) in enumerate(zip(got, want)):
        keep = torch.ones(g.shape[0], dtype=torch.bool)
        keep[list(skip_slots)] = False
        kind, layer = ("K", "V")[i // (len(got) // 2)], i % (len(got) // 2)
        torch.testing.assert_close(g[keep], w[keep], atol=ATOL, rtol=RTOL, msg=lambda m: f"{kind} layer {layer}: {m}")


# ---- the fixture itself --------------------------------------------------------------------------

def test_standin_is_sglangs_model_with_mrope(standin):
    from sglang.srt.layers.rotary_embedding.mrope import MRotaryEmbedding
    from sglang.srt.models.qwen2 import Qwen2DecoderLayer, Qwen2Model

    assert type(standin.lm) is Qwen2Model and all(type(layer) is Qwen2DecoderLayer for layer in standin.lm.layers)
    rotary = standin.rotary
    assert isinstance(rotary, MRotaryEmbedding) and rotary.mrope_section == [2, 3, 3]
    assert rotary._forward_method == rotary.forward_native
    torch.testing.assert_close(rotary.cos_sin_cache[5, :8], torch.cos(5 * standin.inv_freq))


def test_a_cached_prefix_then_its_extend_is_one_stock_prefill(standin):
    """The reference's cached prefix: a stock prefill of the prefix, then the extend over it, gives
    what one prefill of the whole request gives (torch_native reads the prefix from the pool)."""
    chunked = standin.make_batch([PREFIXED])
    whole = standin.make_batch([RequestSpec(PREFIXED.seq_len, 0, PREFIXED.images)], token_ids=chunked.token_ids)
    want = standin.stock_forward(whole)
    torch.testing.assert_close(standin.stock_forward(chunked), want[PREFIXED.prefix_len:], atol=ATOL, rtol=RTOL)
    for layer in range(standin.num_layers):
        for got_kv, want_kv in zip(standin.kv(layer, chunked.slots[0]), standin.kv(layer, whole.slots[0])):
            torch.testing.assert_close(got_kv, want_kv, atol=ATOL, rtol=RTOL)
    free_slots = standin.allocator.available_size()
    standin.free(chunked)
    standin.free(whole)
    assert standin.allocator.available_size() == free_slots + 2 * PREFIXED.seq_len


# ---- every token at every layer: policy full ------------------------------------------------------

def test_full_recompute_is_sglangs_forward(standin, triton_attention):
    batch = standin.make_batch([PREFIXED, FRESH])
    want, want_pool = stock_reference(standin, batch)

    sets = [policy_sets(PREFIXED, "full", standin.num_layers), None]
    assert all(s is sets[0][0] for s in sets[0]), "full: one set for every layer"
    assert torch.equal(sets[0][0], torch.arange(PREFIXED.prefix_len, PREFIXED.seq_len))
    got, prefill = vlcache_forward(standin, batch, sets)

    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert_pools_equal(standin.snapshot_kv(), want_pool)
    assert prefill._backends == ["triton"], "planned once, on the Triton kernel"
    assert triton_attention == ["flashinfer"], "on a GPU the choice would be FlashInfer (2 contiguous runs)"


def test_an_observing_policy_that_keeps_everything_is_sglangs_forward(standin, triton_attention):
    """cacheblend at ratio 1 through a real LayerSelector: the check layer computes QKV, hands the
    fresh and cached K/V to the policy, keeps every token; the result must be stock's."""
    from vlcache_sglang.layer_selector import LayerSelector
    from vlcache_sglang.recompute_policy import PolicyParams, get_recompute_policy

    batch = standin.make_batch([PREFIXED, FRESH])
    want, want_pool = stock_reference(standin, batch)

    layout = PREFIXED.token_layout()
    policy = get_recompute_policy("cacheblend", PolicyParams(recompute_ratio=1.0, check_layer=1))
    plan = SimpleNamespace(selector=LayerSelector(policy, layout, standin.num_layers), report=None)
    assert not plan.selector.ready(1), "the check layer waits for its observation"
    got, _ = run_plans(standin, batch, [plan, None])
    assert plan.selector.ready(standin.num_layers - 1)
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    assert_pools_equal(standin.snapshot_kv(), want_pool)


# ---- a shrinking set: S_1 ⊂ S_0, the dropped tokens' layer-1 KV from a reuse copy ----------------

def _shrinking_sets(num_layers: int, stepped: bool = False):
    """S_0 = every token; after layer 0 drop image tokens (scattered in the fresh request, so
    S_1 has several runs per request); a third layer, if any, drops one more (stepped: keeps S_1, so
    the sets change only at layers 0 and 1, a stepped profile's two segments)."""
    a_img = torch.arange(12, 28)
    a0 = torch.arange(PREFIXED.prefix_len, PREFIXED.seq_len)
    a1 = a0[~torch.isin(a0, a_img[4:13])]  # keeps the image's first 4 and last 3 tokens
    b0 = torch.arange(FRESH.seq_len)
    b1 = b0[~torch.isin(b0, torch.tensor([4, 5, 8, 11, 12, 13]))]
    a, b = [a0, a1], [b0, b1]
    if num_layers == 3:
        a.append(a1 if stepped else a1[a1 != 12])
        b.append(b1)  # unchanged: the same object
    return [a, b]


def _graph_body_prefill(standin: StandIn, monkeypatch, bucket: int, segments=(), tails=()):
    """A SelectivePrefill whose CUDA graph path runs on the CPU: the capture replaced by rerunning the
    captured body (as in test_selective_graph.py), one bucket, a small fixed tile grid; `segments`:
    the layer ranges of a stepped plan, captured too; `tails`: first layers of [lo, last] ranges."""
    from vlcache_sglang.model_patch import selective_graph
    from vlcache_sglang.model_patch.selective_prefill import SelectivePrefill

    def rerun(body, pool, device):
        out = body()
        return (lambda: out.copy_(body())), out

    monkeypatch.setattr(selective_graph, "cuda_graph_capture", rerun)
    # Its fixed grid has a tile per possible request beyond the full ones; interpreted, 64 cost 10 s.
    monkeypatch.setattr(selective_graph, "MAX_REQUESTS_PER_GRAPH", 2)
    prefill = SelectivePrefill(standin.inv_freq)
    prefill._graphs = selective_graph.SelectiveGraphs(buckets=(bucket,), why_not=lambda *args: None,
                                                      segments=segments, tails=tails)
    return prefill


SEGMENTS = ((0, 1), (1, 3))


@pytest.mark.parametrize("num_layers,graph,stepped,segments", [
    (2, False, False, ()), (3, False, False, ()), (3, True, False, ()), (3, True, True, SEGMENTS),
    (3, True, False, SEGMENTS)], ids=["2-eager", "3-eager", "3-graph-body", "3-graph-segments",
                                      "3-segments-other-steps"])
def test_shrinking_sets_match_sglang_with_reused_kv(standin, triton_attention, monkeypatch, num_layers, graph,
                                                    stepped, segments):
    """graph-body: the shrinking plan in the CUDA graph path, S_0 at every layer with per-layer write
    slots (a dropped token writes slot 0 and keeps its cached K/V). graph-segments: a stepped plan
    (sets change at layers 0 and 1 only) through one graph per captured segment, [0, 1) and [1, 3);
    other-steps: a plan that changes at layer 2 too, which those segments cannot run, takes S_0's graph."""
    model = standin if num_layers == standin.num_layers else build_standin(num_layers=num_layers)
    batch = model.make_batch([PREFIXED, FRESH])
    sets = _shrinking_sets(num_layers, stepped)
    layer_sets = batch.by_layer(sets)
    # The reuse copy: every token outside S_l gets (other) KV at layer l before the forward.
    reused = model.reuse_copy(batch, layer_sets)
    assert sorted(reused) == list(range(1, num_layers)), "S_0 is every token"
    want, want_pool = stock_reference(model, batch, layer_sets)

    prefill = _graph_body_prefill(model, monkeypatch, bucket=64, segments=segments) if graph else None
    got, prefill = vlcache_forward(model, batch, sets, prefill)

    last = batch.rows_of(layer_sets[-1])
    torch.testing.assert_close(got[last], want[last], atol=ATOL, rtol=RTOL)
    others = torch.ones(batch.num_tokens, dtype=torch.bool)
    others[last] = False
    assert not got[others].any(), "rows outside the last S_l stay zero"
    # Tokens a layer drops (and a graph bucket's padding) write slot 0, SGLang's slot for padded writes.
    assert_pools_equal(model.snapshot_kv(), want_pool, skip_slots=(0,) if graph else ())
    for layer, (slots, k, v) in reused.items():
        assert torch.equal(model.kv(layer, slots)[0], k) and torch.equal(model.kv(layer, slots)[1], v), \
            f"layer {layer}: the reused KV of dropped tokens is left alone"
    if stepped:
        assert prefill._backends == ["triton-graph-segments"]
        assert not any(sel.charged_first_set for sel in prefill.test_selectors), "each layer's own set"
    elif graph:
        assert prefill._backends == ["triton-graph"]
        assert all(sel.charged_first_set for sel in prefill.test_selectors), "charged S_0 at every layer"
    else:
        assert prefill._backends == ["triton"] * num_layers, "every layer's set differs: planned per layer"


# ---- one set for every layer (first_k): the eager loop and the graph body ---------------------------

@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph-body"])
def test_first_k_matches_sglang_with_reused_kv(standin, triton_attention, monkeypatch, graph):
    """S_l = text + each image's first 3 tokens at every layer; the other image tokens' KV comes from
    a reuse copy at every layer. graph-body: the CUDA graph path (SelectiveGraphs, padded to its
    bucket, fixed-capacity Triton plan) with the capture replaced by rerunning the captured body,
    as in test_selective_graph.py; on a CPU the real server gets "no CUDA device" and the eager loop."""
    batch = standin.make_batch([PREFIXED, FRESH])
    sets = [policy_sets(spec, "first_k", standin.num_layers, first_k=3) for spec in (PREFIXED, FRESH)]
    layer_sets = batch.by_layer(sets)
    reused = standin.reuse_copy(batch, layer_sets)
    assert [slots.numel() for slots, _, _ in reused.values()] == [(16 - 3) + (12 - 3)] * standin.num_layers
    want, want_pool = stock_reference(standin, batch, layer_sets)

    prefill = _graph_body_prefill(standin, monkeypatch, bucket=32) if graph else None
    got, prefill = vlcache_forward(standin, batch, sets, prefill)

    rows = batch.rows_of(layer_sets[0])
    torch.testing.assert_close(got[rows], want[rows], atol=ATOL, rtol=RTOL)
    # Padding tokens of a graph bucket write slot 0, SGLang's slot for padded writes.
    assert_pools_equal(standin.snapshot_kv(), want_pool, skip_slots=(0,) if graph else ())
    assert prefill._backends == (["triton-graph"] if graph else ["triton"])
    if not graph:
        assert prefill._graphs.disabled == "no CUDA device"


# ---- a probe: the check layer measures a sample, the loop starts over with the decided sets ---------

@pytest.mark.parametrize("bound,graph", [(0.0, False), (1e9, False), (1e9, True)],
                         ids=["beyond-the-bound", "within-it", "within-it-graph-body"])
def test_a_probe_replans_from_layer_0_and_matches_sglang(standin, triton_attention, monkeypatch, bound, graph):
    """image_bounded with a 1/4 sample: layer 0 computes text + the floor + every 4th image token,
    the check at layer 1 measures them, and the loop starts over. Beyond the bound the image is
    recomputed whole (= stock's forward, pools included); within it only the floor runs on, and the
    sampled tokens keep the layer-0 K/V the probe wrote (fresh: layer 0 depends on token and
    position alone), which the reference reproduces by writing them at layer 0. graph-body: the
    rerun's plan is the same at every layer, so it takes the CUDA-graph path (its body rerun on
    the CPU)."""
    from vlcache_sglang.layer_selector import LayerSelector
    from vlcache_sglang.recompute_policy import PolicyParams, get_recompute_policy

    batch = standin.make_batch([PREFIXED, FRESH])
    layout = PREFIXED.token_layout()
    policy = get_recompute_policy("image_bounded", PolicyParams(recompute_ratio=0.1, check_layer=1,
                                                                error_bound=bound, check_sample=0.25))
    plan = SimpleNamespace(selector=LayerSelector(policy, layout, standin.num_layers), report=None)
    base = layout.base_tokens()
    probe = plan.selector.sets[0]
    assert probe.tolist() == sorted(base.tolist() + [12, 16, 20, 24]), "floor 12 (1 of 16) + every 4th"
    floor = torch.sort(torch.cat([base, torch.tensor([12])])).values
    # Cached K/V in every image slot (the reuse copy); the probe's sample reads them at layer 1.
    standin.reuse_copy(batch, batch.by_layer([[base, base], None]))
    if bound == 0.0:
        want, want_pool = stock_reference(standin, batch)
    else:
        want, want_pool = stock_reference(standin, batch, batch.by_layer([[probe, floor], None]))

    got, prefill = run_plans(standin, batch, [plan, None],
                             _graph_body_prefill(standin, monkeypatch, bucket=64) if graph else None)

    assert plan.selector.replanned
    final = plan.selector.sets[-1]
    assert torch.equal(final, torch.arange(PREFIXED.prefix_len, PREFIXED.seq_len) if bound == 0.0 else floor)
    rows = batch.rows_of([final, torch.arange(FRESH.seq_len)])
    torch.testing.assert_close(got[rows], want[rows], atol=ATOL, rtol=RTOL)
    # A graph bucket's padding writes slot 0, SGLang's slot for padded writes.
    assert_pools_equal(standin.snapshot_kv(), want_pool, skip_slots=(0,) if graph else ())
    assert prefill._backends == ["triton", "triton-graph" if graph else "triton"], \
        "planned at layer 0 of the probe, then the rerun's plan"
    main = 16 if bound == 0.0 else 1
    assert plan.selector.outcome().computed_token_layers == 4 + 4 + main * standin.num_layers


# ---- after a check layer: the remaining layers as one graph ----------------------------------------

def test_the_layers_after_a_check_replay_one_tail_graph_as_the_eager_loop_runs_them(standin, triton_attention,
                                                                                    monkeypatch):
    """cacheblend (check layer 1) on a 3-layer stand-in: the eager loop observes at layer 1, keeps
    the top quarter, and runs layer 2; with a tail graph from layer 2 that layer is one replay. Same
    kept tokens, outputs and pools (a graph bucket's padding writes slot 0)."""
    from vlcache_sglang.layer_selector import LayerSelector
    from vlcache_sglang.recompute_policy import PolicyParams, get_recompute_policy

    model = build_standin(num_layers=3)
    batch = model.make_batch([PREFIXED, FRESH])
    layout = PREFIXED.token_layout()
    base = layout.base_tokens()
    model.reuse_copy(batch, batch.by_layer([[base] * 3, None]))  # cached K/V in every image slot
    policy = get_recompute_policy("cacheblend", PolicyParams(recompute_ratio=0.25, check_layer=1))
    before = model.snapshot_kv()

    def run(prefill):
        model.restore_kv(before)
        plan = SimpleNamespace(selector=LayerSelector(policy, layout, model.num_layers), report=None)
        got, prefill = run_plans(model, batch, [plan, None], prefill)
        return got, prefill, plan.selector, model.snapshot_kv()

    want, eager, want_sel, want_pool = run(None)
    got, graphed, got_sel, got_pool = run(_graph_body_prefill(model, monkeypatch, bucket=64, tails=(2,)))
    assert all(torch.equal(a, b) for a, b in zip(got_sel.sets, want_sel.sets))
    rows = batch.rows_of([got_sel.sets[-1], torch.arange(FRESH.seq_len)])
    torch.testing.assert_close(got[rows], want[rows], atol=ATOL, rtol=RTOL)
    assert_pools_equal(got_pool, want_pool, skip_slots=(0,))
    assert eager._backends == ["triton", "triton"]
    assert graphed._backends == ["triton", "triton", "triton-graph-tail"], "layer 2 as a replay"
