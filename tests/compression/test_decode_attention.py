"""Decode over per-layer kept sets through SGLang's own TritonAttnBackend (init_forward_metadata and
forward_decode, the real methods, through our AROUND hooks) on the CPU under TRITON_INTERPRET=1:
a trimmed request attends exactly its layer's kept tokens plus its decode tokens (torch reference
on the uncompressed KV); an untrimmed request in the same batch, and every request when none is
trimmed (alpha = 1), get SGLang's own result bit for bit."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from sglang.srt.model_executor.forward_batch_info import ForwardMode

from kv_pool import make_kv_pool
from vlcache_sglang.compression.compressor import VLCacheCompression
from vlcache_sglang.compression.config import CompressionConfig
from vlcache_sglang.compression.decode_attention import LAYER_TABLES_ATTR, KeptDecodeAttention
from vlcache_sglang.compression.decode_tables import KeptLengthTable
from vlcache_sglang.compression.step import PrefillView
from vlcache_sglang.kernels.attention_scores_reference import post_vision_scores_reference

LAYERS, QO, KV, D = 3, 4, 2, 16
SLOTS, ROWS, CONTEXT = 200, 4, 96
M, IMAGE, DECODED = 41, (3, 33), 3  # prompt of the trimmed request; its decode tokens (the last is new)
OTHER = 29  # the untrimmed request's length (prompt + decode)
SCALE = 1 / math.sqrt(D)


def _backend(pool, req_to_token, device):
    """SGLang's TritonAttnBackend with the attributes its decode path reads (no model runner on CPU)."""
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    backend = TritonAttnBackend.__new__(TritonAttnBackend)
    backend.__dict__.update(
        decode_attention_fwd=decode_attention_fwd, req_to_token=req_to_token, token_to_kv_pool=pool,
        kv_indptr=torch.zeros(ROWS + 1, dtype=torch.int32, device=device), window_kv_indptr=None, sliding_window_size=None,
        dcp_size=1, dcp_rank=0, _translate_kv_loc=None, use_sliding_window_kv_pool=False, num_head=QO,
        num_kv_head=KV, max_kv_splits=4, v_head_dim=D, swa_v_head_dim=None, device=device, static_kv_splits=True,
        device_core_count=0, enable_deterministic=False, use_mla=False, use_pdl=False, page_size=1,
        max_context_len=CONTEXT, forward_metadata=None)
    return backend


def _layer(layer_id):
    return SimpleNamespace(layer_id=layer_id, tp_q_head_num=QO, tp_k_head_num=KV, tp_v_head_num=KV, qk_head_dim=D,
                           v_head_dim=D, head_dim=D, scaling=SCALE, logit_capping_method="tanh", logit_cap=0.0,
                           sliding_window_size=None, k_scale=None, v_scale=None, xai_temperature_len=-1)


def _attend(q, k, v, slots):
    """softmax(q K^T * scale) V over `slots`; q [qo, d], k/v [slots, kv, d]."""
    group = QO // KV
    kk = k[slots].float().repeat_interleave(group, 1)
    vv = v[slots].float().repeat_interleave(group, 1)
    p = (torch.einsum("hd,khd->hk", q.float(), kk) * SCALE).softmax(-1)
    return torch.einsum("hk,khd->hd", p, vv)


def _setup(alpha, device, seed=3):
    """On the GPU when there is one (SGLang's kernels are real Triton there), else the CPU interpreter."""
    gen = torch.Generator().manual_seed(seed)
    pool, allocator = make_kv_pool(SLOTS, LAYERS, KV, D, device, seed=seed)
    req_to_token = torch.zeros(ROWS, CONTEXT, dtype=torch.int32)
    slots = torch.randperm(SLOTS - 1, generator=gen)[: M + DECODED + OTHER] + 1  # slot 0 is reserved
    req_to_token[1, : M + DECODED] = slots[: M + DECODED].to(torch.int32)
    req_to_token[2, :OTHER] = slots[M + DECODED:].to(torch.int32)
    req_to_token = req_to_token.to(device)
    kept = KeptLengthTable(ROWS, LAYERS, device)
    plan = None
    if alpha < 1:  # the prefill's trim of request row 1 (the decode tokens come after it)
        step = VLCacheCompression(CompressionConfig(compress_ratio=alpha), scorer=post_vision_scores_reference)
        positions = step.query_positions(M, [IMAGE]).to(device)
        queries = [(torch.randn(positions.numel(), QO, D, generator=gen) * (1 + 2 * layer)).to(device)
                   for layer in range(LAYERS)]
        originals = ([k.clone() for k in pool.k_buffer], [v.clone() for v in pool.v_buffer])
        plan = step.run(PrefillView(1, M, 0, req_to_token, pool.k_buffer, pool.v_buffer, positions, queries,
                                    SCALE)).plan
        assert plan is not None
        kept.set(1, plan)
    else:
        originals = ([k.clone() for k in pool.k_buffer], [v.clone() for v in pool.v_buffer])
    seq_lens = torch.tensor([M + DECODED, OTHER], device=device)
    fb = SimpleNamespace(batch_size=2, forward_mode=ForwardMode.DECODE, spec_info=None,
                         req_pool_indices=torch.tensor([1, 2], device=device), seq_lens=seq_lens,
                         seq_lens_sum=int(seq_lens.sum()),
                         out_cache_loc=torch.stack([req_to_token[1, M + DECODED - 1], req_to_token[2, OTHER - 1]]).long(),
                         extend_seq_lens_cpu=None, positions=None)
    q = [torch.randn(2, QO * D, generator=gen).to(device) for _ in range(LAYERS)]
    new_k = [torch.randn(2, KV * D, generator=gen).to(device) for _ in range(LAYERS)]
    new_v = [torch.randn(2, KV * D, generator=gen).to(device) for _ in range(LAYERS)]
    return pool, req_to_token, kept, plan, originals, fb, q, new_k, new_v


def _decode_step(backend, fb, q, new_k, new_v, hooks):
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    if hooks is None:
        TritonAttnBackend.init_forward_metadata(backend, fb)
        run = lambda *a: TritonAttnBackend.forward_decode(backend, *a)  # noqa: E731
    else:
        hooks.around_init_forward_metadata(TritonAttnBackend.init_forward_metadata, backend, fb)
        run = lambda *a: hooks.around_forward_decode(TritonAttnBackend.forward_decode, backend, *a)  # noqa: E731
    # RadixAttention.forward hands the backend k/v as [tokens, kv_heads, head_dim].
    return [run(q[layer], new_k[layer].view(-1, KV, D), new_v[layer].view(-1, KV, D), _layer(layer), fb)
            for layer in range(LAYERS)]


def assert_matches_reference(got, req_to_token, plan, kv0, fb, q, new_k, new_v, device, rows=(0, 1)) -> None:
    """Each layer's output against a torch reference: batch row 0 (the trimmed request) over its layer's
    kept prompt tokens' original KV then its decode tokens (this step's new one included), row 1 (an
    untrimmed request) over its whole row."""
    k0, v0 = kv0
    row1, row2 = req_to_token[1].long(), req_to_token[2].long()
    # SGLang's decode kernel multiplies fp32 in TF32 on the GPU (H200: max |diff| 7.8e-4 against fp32,
    # 2026-12-01); a wrong token set is off by O(0.1). The untrimmed row is held bit-equal to stock elsewhere.
    tol = 1e-5 if device == "cpu" else 3e-3
    for layer in range(LAYERS):
        k_ref, v_ref = k0[layer].clone(), v0[layer].clone()
        k_ref[fb.out_cache_loc] = new_k[layer].view(2, KV, D)
        v_ref[fb.out_cache_loc] = new_v[layer].view(2, KV, D)
        slots = {0: torch.cat([row1[plan.kept_positions[layer]], row1[M: M + DECODED]]), 1: row2[:OTHER]}
        for r in rows:
            want = _attend(q[layer][r].view(QO, D), k_ref, v_ref, slots[r])
            torch.testing.assert_close(got[layer][r].view(QO, D), want, rtol=tol, atol=tol)
    assert max(plan.kept_lengths) < M  # the layers really attended fewer prompt tokens


def test_a_trimmed_request_attends_its_layers_kept_tokens_and_an_untrimmed_one_is_unchanged(device):
    pool, req_to_token, kept, plan, (k0, v0), fb, q, new_k, new_v = _setup(alpha=0.25, device=device)
    backend = _backend(pool, req_to_token, device)
    hooks = KeptDecodeAttention(kept, live_trimmed=lambda: 1)
    got = _decode_step(backend, fb, q, new_k, new_v, hooks)
    assert getattr(backend.forward_metadata, LAYER_TABLES_ATTR) is not None
    assert_matches_reference(got, req_to_token, plan, (k0, v0), fb, q, new_k, new_v, device)

    # The untrimmed row equals SGLang's own decode of the same batch bit for bit.
    pool2, req_to_token2, _, _, _, fb2, q2, k2, v2 = _setup(alpha=0.25, device=device)
    stock = _decode_step(_backend(pool2, req_to_token2, device), fb2, q2, k2, v2, hooks=None)
    for layer in range(LAYERS):
        assert torch.equal(got[layer][1], stock[layer][1])


def test_without_trimmed_requests_the_decode_path_is_sglangs_own(device):
    pool, req_to_token, kept, _, _, fb, q, new_k, new_v = _setup(alpha=1.0, device=device)
    backend = _backend(pool, req_to_token, device)
    got = _decode_step(backend, fb, q, new_k, new_v, KeptDecodeAttention(kept, live_trimmed=lambda: 0))
    assert getattr(backend.forward_metadata, LAYER_TABLES_ATTR, None) is None
    pool2, req_to_token2, _, _, _, fb2, q2, k2, v2 = _setup(alpha=1.0, device=device)
    stock = _decode_step(_backend(pool2, req_to_token2, device), fb2, q2, k2, v2, hooks=None)
    for layer in range(LAYERS):
        assert torch.equal(got[layer], stock[layer])
