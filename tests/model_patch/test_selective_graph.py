"""CUDA graphs of the selective decoder loop against the eager loop, on a small stand-in model.

The stand-in has Qwen2's layer interface (SGLang's norm/linear call conventions, a position-dependent
rotary, a KV pool with set/get_kv_buffer). On a GPU the graphs are really captured and replayed; on
CPU the capture is replaced by running the same body, which still checks the static buffers, the
padding, the fixed-capacity attention plan and the fallbacks.
"""

from __future__ import annotations

import math
from types import SimpleNamespace as NS

import pytest
import torch

from vlcache_sglang.kernels.scattered_attention import ScatteredAttention
from vlcache_sglang.model_patch import selective_graph
from vlcache_sglang.model_patch.selective_attention import runs_of
from vlcache_sglang.model_patch.selective_graph import SelectiveGraphs
from vlcache_sglang.model_patch.selective_layers import all_layers, layer_range

# The server's check asks SGLang's server args and wants CUDA; these tests run the graphs on CPU too.
ALLOWED = lambda lm, model_dtype, kv_dtype: None  # noqa: E731
HIDDEN, QO_HEADS, KV_HEADS, HEAD_DIM, LAYERS, SLOTS, WIDTH = 32, 4, 2, 16, 3, 128, 40


class Norm(torch.nn.Module):
    """SGLang's RMSNorm convention: norm(x) or norm(x, residual) -> (normed, x + residual)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(1 + 0.1 * torch.randn(HIDDEN))

    def forward(self, x, residual=None):
        if residual is not None:
            x = x + residual
        out = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight
        return out if residual is None else (out, x)


class Linear(torch.nn.Linear):
    def forward(self, x):  # SGLang's parallel linears return (out, bias)
        return super().forward(x), None


def rotary(positions, q, k):
    # Position-dependent, like M-RoPE: a wrong or stale position changes the output.
    angle = (positions[0] + 2 * positions[1] + 3 * positions[2]).to(q.dtype).unsqueeze(-1) * 0.01
    return q * torch.cos(angle) + 0.5 * torch.sin(angle), k * torch.cos(angle) - 0.5 * torch.sin(angle)


def make_model(device):
    torch.manual_seed(0)
    layers = []
    for layer_id in range(LAYERS):
        radix = NS(tp_q_head_num=QO_HEADS, tp_k_head_num=KV_HEADS, tp_v_head_num=KV_HEADS, head_dim=HEAD_DIM,
                   qk_head_dim=HEAD_DIM, v_head_dim=HEAD_DIM, scaling=1 / math.sqrt(HEAD_DIM), layer_id=layer_id)
        q_size, kv_size = QO_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
        attn = NS(qkv_proj=Linear(HIDDEN, q_size + 2 * kv_size).to(device), q_size=q_size, kv_size=kv_size,
                  rotary_emb=rotary, attn=radix, o_proj=Linear(q_size, HIDDEN).to(device))
        mlp = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 2 * HIDDEN), torch.nn.SiLU(),
                                  torch.nn.Linear(2 * HIDDEN, HIDDEN)).to(device)
        layers.append(NS(input_layernorm=Norm().to(device), post_attention_layernorm=Norm().to(device),
                         self_attn=attn, mlp=mlp))
    return NS(layers=layers, start_layer=0, end_layer=LAYERS, norm=Norm().to(device))


class Pool:
    def __init__(self, device):
        self.k_buffer = [torch.randn(SLOTS, KV_HEADS, HEAD_DIM, device=device) for _ in range(LAYERS)]
        self.v_buffer = [torch.randn(SLOTS, KV_HEADS, HEAD_DIM, device=device) for _ in range(LAYERS)]

    def set_kv_buffer(self, radix, loc, k, v):
        self.k_buffer[radix.layer_id][loc] = k
        self.v_buffer[radix.layer_id][loc] = v

    def get_kv_buffer(self, layer_id):
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    def load_(self, other):
        """other's contents, in place: a captured graph holds this pool's buffers, as SGLang's stays put."""
        for mine, theirs in zip(self.k_buffer + self.v_buffer, other.k_buffer + other.v_buffer):
            mine.copy_(theirs)


def active_tokens(sets, req_to_token, device):
    """hidden, positions, per-layer out_loc [LAYERS, n] (the same slots at every layer) and runs of the
    active tokens {req_row: positions} (request order)."""
    torch.manual_seed(len(sets))
    rows = sorted(sets)
    abs_sets = [torch.tensor(sets[r]) for r in rows]
    runs = runs_of(abs_sets, rows)
    pos = torch.cat(abs_sets)
    out_loc = torch.cat([req_to_token[r, torch.tensor(sets[r])].long() for r in rows]).to(device)
    positions = torch.stack([pos, pos // 3, pos % 5]).to(device)
    return torch.randn(pos.numel(), HIDDEN, device=device), positions, out_loc.repeat(LAYERS, 1), runs


def eager(lm, pool, hidden, positions, out_loc, runs, req_to_token):
    attention = ScatteredAttention()
    rows = torch.repeat_interleave(runs.req_rows, runs.run_len)
    q_pos = torch.cat([torch.arange(int(s), int(s + n)) for s, n in zip(runs.run_start, runs.run_len)])
    attention.plan(rows, q_pos, req_to_token, QO_HEADS, KV_HEADS, HEAD_DIM, 1 / math.sqrt(HEAD_DIM))
    return all_layers(lm, positions, hidden.clone(), out_loc, pool, attention)


@pytest.fixture
def capture(device, monkeypatch):
    """The real CUDA graph capture on a GPU; on CPU, a stand-in that reruns the captured body."""
    if device == "cpu":
        def rerun(body, pool, dev):
            out = body()
            return (lambda: out.copy_(body())), out

        monkeypatch.setattr(selective_graph, "cuda_graph_capture", rerun)
    return device


def test_graph_replays_match_the_eager_loop_and_touch_only_their_slots_and_slot_0(capture):
    device = capture
    lm = make_model(device)
    req_to_token = (1 + torch.randperm(SLOTS - 1)[: 3 * WIDTH]).reshape(3, WIDTH).to(device, torch.int32)
    graphs = SelectiveGraphs(buckets=(8, 16), why_not=ALLOWED)
    want_pool, got_pool = Pool(device), Pool(device)
    # Two requests with two runs each (text before and after an image), then fewer tokens in the
    # same bucket (stale tiles and rows of the first batch must not leak), then the small bucket.
    for sets in ({2: [0, 1, 2, 20, 21], 0: [3, 4, 30, 31, 32, 33]}, {1: [5, 6, 7]}, {0: [39], 2: [10]}):
        hidden, positions, out_loc, runs = active_tokens(sets, req_to_token, device)
        with torch.no_grad():
            base = Pool(device)
            want_pool.load_(base)
            want = eager(lm, want_pool, hidden, positions, out_loc, runs, req_to_token)
            got_pool.load_(base)
            got = graphs.run(lm, hidden, positions, out_loc, runs, req_to_token, got_pool)
        assert got is not None and graphs.disabled is None
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        untouched = torch.ones(SLOTS, dtype=torch.bool)
        untouched[out_loc[0].cpu()] = False
        untouched[0] = False  # padding tokens write slot 0, SGLang's slot for padded writes
        untouched = untouched.to(device)
        for layer in range(LAYERS):
            for got_kv, want_kv, base_kv in ((got_pool.k_buffer, want_pool.k_buffer, base.k_buffer),
                                             (got_pool.v_buffer, want_pool.v_buffer, base.v_buffer)):
                slots = out_loc[layer]
                torch.testing.assert_close(got_kv[layer][slots], want_kv[layer][slots], rtol=1e-4, atol=1e-4)
                assert torch.equal(got_kv[layer][untouched], base_kv[layer][untouched])


def test_per_layer_write_slots_keep_the_cached_kv_of_tokens_a_layer_drops(capture):
    """A shrinking plan in a graph: S_0 at every layer, layer l writes only S_l's K/V (the rest to
    slot 0). Each layer's written slots equal the eager loop's with the same write slots, and the
    slots a layer drops keep the pool's (cached) K/V."""
    device = capture
    lm = make_model(device)
    req_to_token = (1 + torch.randperm(SLOTS - 1)[: 2 * WIDTH]).reshape(2, WIDTH).to(device, torch.int32)
    graphs = SelectiveGraphs(buckets=(16,), why_not=ALLOWED)
    hidden, positions, layer_loc, runs = active_tokens({0: [0, 1, 2, 3, 4, 5, 6], 1: [7, 8, 9]}, req_to_token, device)
    keep = torch.tensor([[1] * 10, [1, 0, 1, 0, 1, 1, 1, 1, 0, 1], [1, 0, 0, 0, 1, 1, 1, 1, 0, 1]],
                        dtype=torch.bool, device=device)
    layer_loc = torch.where(keep, layer_loc, torch.zeros_like(layer_loc))
    base = Pool(device)
    want_pool, got_pool = Pool(device), Pool(device)
    want_pool.load_(base)
    got_pool.load_(base)
    with torch.no_grad():
        want = eager(lm, want_pool, hidden, positions, layer_loc, runs, req_to_token)
        got = graphs.run(lm, hidden, positions, layer_loc, runs, req_to_token, got_pool)
    assert got is not None
    last = keep[-1]
    torch.testing.assert_close(got[last], want[last], rtol=1e-4, atol=1e-4)
    all_slots = layer_loc[0]
    for layer in range(LAYERS):
        written, dropped = all_slots[keep[layer]], all_slots[~keep[layer]]
        for got_kv, want_kv, base_kv in ((got_pool.k_buffer, want_pool.k_buffer, base.k_buffer),
                                         (got_pool.v_buffer, want_pool.v_buffer, base.v_buffer)):
            torch.testing.assert_close(got_kv[layer][written], want_kv[layer][written], rtol=1e-4, atol=1e-4)
            assert torch.equal(got_kv[layer][dropped], base_kv[layer][dropped]), f"layer {layer}: cached K/V kept"
            assert not torch.equal(got_kv[layer][written], base_kv[layer][written])


def test_batches_a_graph_cannot_take_fall_back(capture, monkeypatch):
    device = capture
    lm = make_model(device)
    req_to_token = (1 + torch.randperm(SLOTS - 1)[: 3 * WIDTH]).reshape(3, WIDTH).to(device, torch.int32)
    graphs = SelectiveGraphs(buckets=(8,), why_not=ALLOWED)
    pool = Pool(device)
    too_many = active_tokens({0: list(range(9))}, req_to_token, device)
    assert graphs.run(lm, *too_many, req_to_token, pool) is None, "9 tokens > the largest bucket"
    monkeypatch.setattr(selective_graph, "MAX_REQUESTS_PER_GRAPH", 1)
    three_requests = active_tokens({0: [1], 1: [2], 2: [3]}, req_to_token, device)
    with torch.no_grad():
        assert graphs.run(lm, *three_requests, req_to_token, pool) is None, "more tiles than captured"
        assert graphs.disabled is None
        assert graphs.run(lm, *active_tokens({0: [1, 2]}, req_to_token, device), req_to_token, pool) is not None


def test_a_failed_capture_turns_graphs_off_for_good(device, monkeypatch):
    def broken(body, pool, dev):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(selective_graph, "cuda_graph_capture", broken)
    lm = make_model(device)
    req_to_token = (1 + torch.randperm(SLOTS - 1)[:WIDTH]).reshape(1, WIDTH).to(device, torch.int32)
    graphs = SelectiveGraphs(buckets=(8,), why_not=ALLOWED)
    batch = active_tokens({0: [1, 2]}, req_to_token, device)
    assert graphs.run(lm, *batch, req_to_token, Pool(device)) is None
    assert "capture failed: RuntimeError: operation not permitted" in graphs.disabled
    assert graphs.run(lm, *batch, req_to_token, Pool(device)) is None


def test_a_reason_against_graphs_is_kept_and_nothing_is_captured(device, monkeypatch):
    def never(*args):
        raise AssertionError("no capture when graphs are not allowed")

    monkeypatch.setattr(selective_graph, "cuda_graph_capture", never)
    lm = make_model(device)
    req_to_token = (1 + torch.randperm(SLOTS - 1)[:WIDTH]).reshape(1, WIDTH).to(device, torch.int32)
    asked = []
    graphs = SelectiveGraphs(buckets=(8,), why_not=lambda *args: asked.append(args[1:]) or "--disable-cuda-graph")
    batch = active_tokens({0: [1, 2]}, req_to_token, device)
    assert graphs.run(lm, *batch, req_to_token, Pool(device)) is None
    assert graphs.run(lm, *batch, req_to_token, Pool(device)) is None
    assert graphs.disabled == "--disable-cuda-graph" and asked == [(torch.float32, torch.float32)], "asked once"


def test_bucket_for():
    assert selective_graph.bucket_for(1) == 32 and selective_graph.bucket_for(32) == 32
    assert selective_graph.bucket_for(33) == 64 and selective_graph.bucket_for(1025) is None


def test_why_not_graphs_names_the_switch_and_the_missing_device(monkeypatch):
    lm = NS(layers=[None] * 2, start_layer=0, end_layer=2)
    monkeypatch.setenv(selective_graph.ENV_VAR, "0")
    assert selective_graph.why_not_graphs(lm, torch.bfloat16, torch.bfloat16) == "VLCACHE_CUDA_GRAPH=0"
    monkeypatch.delenv(selective_graph.ENV_VAR)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert selective_graph.why_not_graphs(lm, torch.bfloat16, torch.bfloat16) == "no CUDA device"


def test_tail_graphs_only_for_a_plain_check():
    from vlcache_sglang.model_patch.selective_graph import tail_starts
    from vlcache_sglang.recompute_policy import PolicyParams, get_recompute_policy

    def tails(name, **params):
        return tail_starts(get_recompute_policy(name, PolicyParams(**params)), num_layers=8)

    assert tails("image_bounded", check_sample=1.0) == (2,) and tails("cacheblend", check_layer=3) == (4,)
    assert tails("image_bounded", check_sample=0.1) == (), "a probe replans from layer 0: no tail to replay"
    assert tails("vlcache") == tails("first_k") == tails("none") == (), "static plans have no check layer"


def test_layer_segments_are_the_runs_of_equal_ratios():
    from vlcache_sglang.model_patch.selective_graph import layer_segments

    assert layer_segments((0.3, 0.3, 0.1, 0.1, 0.1, 0.02)) == ((0, 2), (2, 5), (5, 6))
    assert layer_segments((0.05,) * 4) == () and layer_segments(None) == (), "one set: the plain graph"


def test_segment_graphs_run_a_stepped_plan_as_the_eager_loop_does(capture):
    """Sets that change only at layer 1 ([0, 1): 10 tokens, [1, 3): 7 of them), one graph per segment,
    each in its own bucket (16 and 8): the last set's outputs and every layer's written K/V equal the
    eager loop with the same per-layer write slots, dropped tokens keep their cached K/V."""
    from vlcache_sglang.model_patch.selective_graph import SegmentInput

    device = capture
    lm = make_model(device)
    req_to_token = (1 + torch.randperm(SLOTS - 1)[: 2 * WIDTH]).reshape(2, WIDTH).to(device, torch.int32)
    sets = {0: [0, 1, 2, 3, 4, 5, 6], 1: [7, 8, 9]}
    hidden, positions, layer_loc, runs = active_tokens(sets, req_to_token, device)
    kept = torch.tensor([0, 2, 4, 5, 6, 7, 9], device=device)
    keep = torch.zeros(10, dtype=torch.bool, device=device)
    keep[kept] = True
    masked_loc = layer_loc.clone()
    masked_loc[1:, ~keep] = 0
    later_runs = runs_of([torch.tensor([0, 2, 4, 5, 6]), torch.tensor([7, 9])], [0, 1])
    graphs = SelectiveGraphs(buckets=(8, 16), why_not=ALLOWED, segments=((0, 1), (1, LAYERS)))
    base, want_pool, got_pool = Pool(device), Pool(device), Pool(device)
    with torch.no_grad():
        assert graphs.capture(lm, hidden.dtype, HIDDEN, torch.int64, req_to_token, got_pool)
        want_pool.load_(base)
        got_pool.load_(base)
        want = eager(lm, want_pool, hidden, positions, masked_loc, runs, req_to_token)
        segments = [SegmentInput(0, 1, None, positions, layer_loc[0], runs),
                    SegmentInput(1, LAYERS, kept, positions[:, kept], layer_loc[0][kept], later_runs)]
        got = graphs.run_segments(lm, hidden, segments, req_to_token, got_pool)
    assert got is not None and got.shape == (7, HIDDEN)
    torch.testing.assert_close(got, want[kept], rtol=1e-4, atol=1e-4)
    for layer in range(LAYERS):
        written = masked_loc[layer][masked_loc[layer] != 0]
        dropped = layer_loc[0][~keep] if layer else layer_loc[0][:0]
        for got_kv, want_kv, base_kv in ((got_pool.k_buffer, want_pool.k_buffer, base.k_buffer),
                                         (got_pool.v_buffer, want_pool.v_buffer, base.v_buffer)):
            torch.testing.assert_close(got_kv[layer][written], want_kv[layer][written], rtol=1e-4, atol=1e-4)
            assert torch.equal(got_kv[layer][dropped], base_kv[layer][dropped]), f"layer {layer}: cached K/V kept"
    # A segment with no graph of its own (another step) is refused before anything is replayed.
    other = [SegmentInput(0, 2, None, positions, layer_loc[0], runs)]
    assert graphs.run_segments(lm, hidden, other, req_to_token, got_pool) is None


def test_a_tail_graph_runs_the_last_layers_as_the_eager_loop_does(capture):
    """Layers [1, 3) from a given hidden state and residual (what the eager loop hands over after an
    observing policy's check layer), one set at every layer: the graph's output and written K/V equal
    the eager layers'; layer 0's K/V is not touched."""
    from vlcache_sglang.model_patch.selective_attention import query_tokens
    from vlcache_sglang.model_patch.selective_graph import SegmentInput

    device = capture
    lm = make_model(device)
    req_to_token = (1 + torch.randperm(SLOTS - 1)[: 2 * WIDTH]).reshape(2, WIDTH).to(device, torch.int32)
    hidden, positions, layer_loc, runs = active_tokens({0: [0, 1, 2, 3, 4], 1: [7, 8, 9]}, req_to_token, device)
    residual = torch.randn_like(hidden)
    graphs = SelectiveGraphs(buckets=(8, 16), why_not=ALLOWED, tails=(1,))
    base, want_pool, got_pool = Pool(device), Pool(device), Pool(device)
    with torch.no_grad():
        assert graphs.capture(lm, hidden.dtype, HIDDEN, torch.int64, req_to_token, got_pool)
        want_pool.load_(base)
        got_pool.load_(base)
        attention = ScatteredAttention()
        attention.plan(*query_tokens(runs), req_to_token, QO_HEADS, KV_HEADS, HEAD_DIM, 1 / math.sqrt(HEAD_DIM))
        want = layer_range(lm, 1, LAYERS, positions, hidden.clone(), residual.clone(), layer_loc[1:], want_pool,
                           attention)
        tail = SegmentInput(1, LAYERS, None, positions, layer_loc[0], runs)
        got = graphs.run_segments(lm, hidden, [tail], req_to_token, got_pool, residual)
        later = SegmentInput(2, LAYERS, None, positions, layer_loc[0], runs)
        assert graphs.run_segments(lm, hidden, [later], req_to_token, got_pool, residual) is None, \
            "no graph of [2, 3) was captured"
    assert got is not None and got.shape == (8, HIDDEN)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    slots = layer_loc[0]
    assert torch.equal(got_pool.k_buffer[0], base.k_buffer[0]), "layer 0 is the eager loop's"
    for layer in (1, 2):
        torch.testing.assert_close(got_pool.k_buffer[layer][slots], want_pool.k_buffer[layer][slots], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_pool.v_buffer[layer][slots], want_pool.v_buffer[layer][slots], rtol=1e-4, atol=1e-4)
