"""Decode CUDA graphs over per-layer kept tables, through SGLang's own TritonAttnBackend graph methods
(`init_cuda_graph_state`, `init_forward_metadata_out_graph` at capture and at replay, `forward_decode`)
and our hooks, as `DecodeCudaGraphRunner` calls them: capture over a dummy batch (seq_len 1, row 0)
before the runtime is bound, then replay a batch with a trimmed and an untrimmed request, padded to the
captured size with SGLang's padding row 0.

On the CPU a graph cannot be captured; SGLang's replay does not rebuild the metadata (the graph replays
the captured kernels on the same buffers), so replay is emulated by refilling the buffers and running
`forward_decode` with the capture-time metadata. The GPU test captures and replays a real CUDAGraph."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from test_decode_attention import (KV, LAYERS, QO, D, _backend, _decode_step, _layer, _setup,
                                   assert_matches_reference)
from vlcache_sglang.compression.decode_attention import LAYER_TABLES_ATTR, KeptDecodeAttention
from vlcache_sglang.compression.decode_graph import GraphBuffers, KeptDecodeGraph, graph_buffers
from vlcache_sglang.compression.decode_tables import KeptLengthTable
from vlcache_sglang.stats import VLCacheStats

MAX_BS = 3  # the captured size: the two-request batch replays padded by one row


def _triton():
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    return TritonAttnBackend


def _graph_backend(pool, req_to_token, device, graph):
    """The test backend plus what SGLang's graph methods read; its cuda-graph state through our hook."""
    backend = _backend(pool, req_to_token, device)
    backend.__dict__.update(kv_indptr=torch.zeros(MAX_BS + 1, dtype=torch.int32, device=device), skip_prefill=True,
                            is_draft_runner=False)
    result = _triton().init_cuda_graph_state(backend, MAX_BS, MAX_BS)
    if graph is not None:
        graph.after_init_cuda_graph_state(result, backend, MAX_BS, MAX_BS)
    return backend


def _capture_batch(device):
    """SGLang's capture_prepare for the largest size: seq_lens = the fill value 1, req_pool_indices 0."""
    return SimpleNamespace(batch_size=MAX_BS, forward_mode=ForwardMode.DECODE, spec_info=None, encoder_lens=None,
                           req_pool_indices=torch.zeros(MAX_BS, dtype=torch.int64, device=device),
                           seq_lens=torch.ones(MAX_BS, dtype=torch.int64, device=device), seq_lens_sum=MAX_BS,
                           out_cache_loc=torch.zeros(MAX_BS, dtype=torch.int64, device=device), positions=None)


def _replay_view(fb):
    """build_replay_fb_view over the runner's buffers: padded rows are row 0 with seq_len 1 (SGLang
    keeps req_to_token row 0 for them); their KV write goes to slot 0."""
    pad = MAX_BS - fb.batch_size
    dev = fb.seq_lens.device
    return SimpleNamespace(
        batch_size=MAX_BS, forward_mode=ForwardMode.DECODE, spec_info=None, encoder_lens=None, positions=None,
        req_pool_indices=torch.cat([fb.req_pool_indices, torch.zeros(pad, dtype=fb.req_pool_indices.dtype, device=dev)]),
        seq_lens=torch.cat([fb.seq_lens, torch.ones(pad, dtype=fb.seq_lens.dtype, device=dev)]),
        seq_lens_sum=fb.seq_lens_sum + pad,
        out_cache_loc=torch.cat([fb.out_cache_loc, torch.zeros(pad, dtype=fb.out_cache_loc.dtype, device=dev)]))


def _padded(x):
    return torch.cat([x, x.new_zeros(MAX_BS - x.shape[0], x.shape[1])])


def _out_graph(backend, fb, graph, in_capture=False):
    original = _triton().init_forward_metadata_out_graph
    if graph is None:
        return original(backend, fb, in_capture=in_capture)
    return graph.around_init_forward_metadata_out_graph(original, backend, fb, in_capture=in_capture)


def _forward_decode(backend, fb, q, new_k, new_v, decode):
    forward_decode = _triton().forward_decode
    run = forward_decode if decode is None else (lambda *a: decode.around_forward_decode(forward_decode, *a))
    return [run(backend, q[layer], new_k[layer].view(-1, KV, D), new_v[layer].view(-1, KV, D), _layer(layer), fb)
            for layer in range(LAYERS)]


def _graph_step(backend, fb, q, new_k, new_v, graph=None, bind=None):
    """Capture (metadata over the dummy batch), bind the runtime's tables, then replay: the refill out of
    the graph, and forward_decode over the capture-time metadata. Returns each layer's real rows."""
    device = fb.seq_lens.device
    _out_graph(backend, _capture_batch(device), graph, in_capture=True)
    captured = backend.forward_metadata
    if bind is not None:
        bind()
    view = _replay_view(fb)
    _out_graph(backend, view, graph)
    assert backend.forward_metadata is captured  # SGLang's replay refills buffers, never the metadata
    out = _forward_decode(backend, view, [_padded(x) for x in q], [_padded(x) for x in new_k],
                          [_padded(x) for x in new_v], None if graph is None else graph.decode)
    return [o[: fb.batch_size] for o in out]


def _hooks():
    decode = KeptDecodeAttention()
    return decode, KeptDecodeGraph(decode)


def test_a_replayed_batch_with_a_trimmed_request_equals_the_eager_per_layer_decode(device):
    pool, req_to_token, kept, plan, (k0, v0), fb, q, new_k, new_v = _setup(alpha=0.25, device=device)
    decode, graph = _hooks()
    backend = _graph_backend(pool, req_to_token, device, graph)
    stats = VLCacheStats()
    got = _graph_step(backend, fb, q, new_k, new_v, graph, bind=lambda: graph.bind(kept, lambda: 1, stats))
    tables = getattr(backend.forward_metadata, LAYER_TABLES_ATTR)
    buffers = graph_buffers(backend)
    assert tables.kv_indptr.data_ptr() == buffers.kv_indptr.data_ptr()  # views of the fixed buffers

    # The eager path (SGLang's init_forward_metadata + forward_decode through the hooks) on the same batch.
    pool2, req_to_token2, kept2, _, _, fb2, q2, k2, v2 = _setup(alpha=0.25, device=device)
    eager_backend = _backend(pool2, req_to_token2, device)
    eager = _decode_step(eager_backend, fb2, q2, k2, v2, KeptDecodeAttention(kept2, live_trimmed=lambda: 1))
    want = getattr(eager_backend.forward_metadata, LAYER_TABLES_ATTR)
    bs = fb.batch_size
    assert torch.equal(buffers.kv_indptr[:, : bs + 1], want.kv_indptr)
    for layer in range(LAYERS):
        n = int(want.kv_indptr[layer, bs])
        assert torch.equal(buffers.kv_indices[layer, :n], want.kv_indices[layer, :n])
        # the padded row reads SGLang's padding row 0: one slot
        assert int(buffers.kv_indptr[layer, bs + 1]) == n + 1
        assert torch.equal(got[layer], eager[layer])

    # ... which is the attention over the layer's kept tokens + decode tokens (torch reference).
    assert_matches_reference(got, req_to_token, plan, (k0, v0), fb, q, new_k, new_v, device, rows=(0,))

    # The untrimmed row equals SGLang's own graph path (stock capture and replay) bit for bit.
    pool3, req_to_token3, _, _, _, fb3, q3, k3, v3 = _setup(alpha=0.25, device=device)
    stock = _graph_step(_graph_backend(pool3, req_to_token3, device, None), fb3, q3, k3, v3)
    for layer in range(LAYERS):
        assert torch.equal(got[layer][1], stock[layer][1])
    assert stats.compress_graph_fallbacks == 0


def test_without_trimmed_requests_the_per_layer_graph_equals_sglangs_graph(device):
    pool, req_to_token, kept, _, _, fb, q, new_k, new_v = _setup(alpha=1.0, device=device)
    decode, graph = _hooks()
    got = _graph_step(_graph_backend(pool, req_to_token, device, graph), fb, q, new_k, new_v, graph,
                      bind=lambda: graph.bind(kept, lambda: 0, VLCacheStats()))
    pool2, req_to_token2, _, _, _, fb2, q2, k2, v2 = _setup(alpha=1.0, device=device)
    stock = _graph_step(_graph_backend(pool2, req_to_token2, device, None), fb2, q2, k2, v2)
    for layer in range(LAYERS):
        assert torch.equal(got[layer], stock[layer])


def test_capture_runs_before_the_runtime_exists_over_sglangs_own_tables(device):
    pool, req_to_token, kept, _, _, fb, _, _, _ = _setup(alpha=0.25, device=device)
    decode, graph = _hooks()
    backend = _graph_backend(pool, req_to_token, device, graph)
    _out_graph(backend, _capture_batch(device), graph, in_capture=True)
    buffers = graph_buffers(backend)
    assert buffers.capacity == pool.size + MAX_BS and buffers.max_bs == MAX_BS
    # unbound: all-zero lengths, i.e. SGLang's table (row 0, one slot per request) on every layer
    want_indptr = backend.kv_indptr[: MAX_BS + 1]
    for layer in range(LAYERS):
        assert torch.equal(buffers.kv_indptr[layer, : MAX_BS + 1], want_indptr)
        assert torch.equal(buffers.kv_indices[layer, :MAX_BS].long(), backend.cuda_graph_kv_indices[:MAX_BS])
    with pytest.raises(ValueError, match="captured for kept lengths"):
        graph.bind(KeptLengthTable(req_to_token.shape[0], LAYERS + 1, device), lambda: 0, VLCacheStats())
    graph.bind(kept, lambda: 1, VLCacheStats())
    assert graph.kept is kept and graph.decode.live_trimmed() == 1


def test_only_the_plain_mha_decode_backend_gets_per_layer_buffers(device):
    pool, req_to_token, *_ = _setup(alpha=1.0, device=device)
    _, graph = _hooks()
    backend = _graph_backend(pool, req_to_token, device, None)
    # the multi-step draft backend shares a kv_indices buffer: speculative decoding, never per-layer
    graph.after_init_cuda_graph_state(None, backend, MAX_BS, MAX_BS, backend.cuda_graph_kv_indices)
    assert graph_buffers(backend) is None
    backend._translate_kv_loc = lambda loc: loc  # SGLang's unified pool
    with pytest.raises(NotImplementedError, match="plain MHA pool"):
        graph.after_init_cuda_graph_state(None, backend, MAX_BS, MAX_BS)


def _runner(buffers):
    return SimpleNamespace(attn_backend=SimpleNamespace(**({} if buffers is None else {"vlcache_graph_tables": buffers})))


_CAPACITY = 40  # slots per layer; MAX_BS rows


@pytest.mark.parametrize("bs, seq_lens_sum, mode, stock, live, want, counted", [
    (2, _CAPACITY - 1, ForwardMode.DECODE, True, 1, True, False),  # fits with its padded row
    (2, _CAPACITY, ForwardMode.DECODE, True, 1, False, True),  # the padded row would not fit: eager, counted
    (3, _CAPACITY, ForwardMode.DECODE, True, 0, True, False),  # no padding: exactly full
    (2, None, ForwardMode.DECODE, True, 0, False, True),  # no host total: eager rather than a read-back
    (2, 10 * _CAPACITY, ForwardMode.DECODE, False, 1, False, False),  # SGLang says no: not ours to count
    (2, 10 * _CAPACITY, ForwardMode.EXTEND, True, 1, True, False),  # not a decode batch
])
def test_decode_graphs_fall_back_to_eager_only_where_the_buffers_cannot_hold_the_batch(
        bs, seq_lens_sum, mode, stock, live, want, counted):
    _, graph = _hooks()
    graph.bind(KeptLengthTable(4, 2, "cpu"), lambda: live, VLCacheStats())
    buffers = GraphBuffers(torch.zeros(2, MAX_BS + 1, dtype=torch.int32), torch.zeros(2, _CAPACITY, dtype=torch.int32))
    fb = SimpleNamespace(forward_mode=mode, spec_info=None, batch_size=bs, seq_lens_sum=seq_lens_sum)
    assert graph.around_can_run_graph(lambda runner, batch: stock, _runner(buffers), fb) is want
    assert graph.stats.compress_graph_fallbacks == int(counted)


@pytest.mark.parametrize("live, want", [(1, False), (0, True)])
def test_a_backend_captured_stock_runs_eagerly_while_a_trimmed_request_is_live(live, want):
    _, graph = _hooks()
    graph.bind(KeptLengthTable(4, 2, "cpu"), lambda: live, VLCacheStats())
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, spec_info=None, batch_size=2, seq_lens_sum=8)
    assert graph.around_can_run_graph(lambda runner, batch: True, _runner(None), fb) is want


def test_the_buffers_are_found_behind_sglangs_hybrid_backend():
    """flashinfer prefill + triton decode: the graph runner holds a HybridAttnBackend."""
    from sglang.srt.layers.attention.hybrid_attn_backend import HybridAttnBackend

    _, graph = _hooks()
    graph.bind(KeptLengthTable(4, 2, "cpu"), lambda: 1, VLCacheStats())
    buffers = GraphBuffers(torch.zeros(2, MAX_BS + 1, dtype=torch.int32), torch.zeros(2, _CAPACITY, dtype=torch.int32))
    decode = SimpleNamespace(vlcache_graph_tables=buffers)
    hybrid = HybridAttnBackend.__new__(HybridAttnBackend)  # only its two backends matter here
    hybrid.prefill_backend, hybrid.decode_backend = SimpleNamespace(), decode
    assert graph_buffers(hybrid) is buffers
    fb = SimpleNamespace(forward_mode=ForwardMode.DECODE, spec_info=None, batch_size=2, seq_lens_sum=8)
    assert graph.around_can_run_graph(lambda runner, batch: True, SimpleNamespace(attn_backend=hybrid), fb)


@pytest.mark.gpu
def test_a_real_cuda_graph_replays_the_per_layer_decode_of_a_trimmed_batch():
    """Capture forward_decode of every layer in a torch.cuda.CUDAGraph (dummy batch, runtime not yet
    bound), then replay it for a trimmed + untrimmed batch: equal to the eager per-layer decode."""
    device = "cuda"
    pool, req_to_token, kept, _, _, fb, q, new_k, new_v = _setup(alpha=0.25, device=device)
    decode, graph = _hooks()
    backend = _graph_backend(pool, req_to_token, device, graph)
    q_buf = [torch.zeros(MAX_BS, QO * D, device=device) for _ in range(LAYERS)]
    k_buf = [torch.zeros(MAX_BS, KV * D, device=device) for _ in range(LAYERS)]
    v_buf = [torch.zeros(MAX_BS, KV * D, device=device) for _ in range(LAYERS)]
    static = _capture_batch(device)  # its out_cache_loc is the runner's static write-location buffer
    _out_graph(backend, static, graph, in_capture=True)
    run = lambda: _forward_decode(backend, static, q_buf, k_buf, v_buf, decode)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()  # warm-up: compiles the kernels outside the capture, as SGLang's runner does
    torch.cuda.current_stream().wait_stream(side)
    cuda_graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(cuda_graph):
        outs = run()

    graph.bind(kept, lambda: 1, VLCacheStats())
    view = _replay_view(fb)
    for layer in range(LAYERS):
        q_buf[layer].copy_(_padded(q[layer]))
        k_buf[layer].copy_(_padded(new_k[layer]))
        v_buf[layer].copy_(_padded(new_v[layer]))
    static.out_cache_loc.copy_(view.out_cache_loc)
    _out_graph(backend, view, graph)
    cuda_graph.replay()
    torch.cuda.synchronize()

    pool2, req_to_token2, kept2, _, _, fb2, q2, k2, v2 = _setup(alpha=0.25, device=device)
    eager = _decode_step(_backend(pool2, req_to_token2, device), fb2, q2, k2, v2,
                         KeptDecodeAttention(kept2, live_trimmed=lambda: 1))
    for layer in range(LAYERS):
        assert torch.equal(outs[layer][: fb.batch_size], eager[layer])
        assert not torch.equal(outs[layer][0], torch.zeros_like(outs[layer][0]))
