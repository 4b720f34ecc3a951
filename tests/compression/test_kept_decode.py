"""Decode over per-layer kept sets through SGLang's own Triton decode kernel (the `triton` attention
backend's `decode_attention_fwd`, which takes kv_indptr / kv_indices per call): each layer's output
equals attention over exactly that layer's kept tokens plus the decode tokens, read from the
uncompressed KV; alpha = 1 is SGLang's own table and the full attention."""

from __future__ import annotations

import math

import pytest
import torch

from vlcache_sglang.compression.compressor import VLCacheCompression
from vlcache_sglang.compression.config import CompressionConfig
from vlcache_sglang.compression.decode_tables import KeptLengthTable
from vlcache_sglang.compression.step import PrefillView

LAYERS, QO, KV, D = 2, 4, 2, 32
M, DECODED, IMAGE = 40, 3, (2, 30)
SLOTS = 128


def _attend(q, k, v, slots, scale):
    """softmax(q K^T * scale) V over the given slots; q [qo, d], k/v [slots, kv, d]."""
    group = q.shape[0] // k.shape[1]
    kk = k[slots].float().repeat_interleave(group, 1)
    vv = v[slots].float().repeat_interleave(group, 1)
    p = (torch.einsum("hd,khd->hk", q.float(), kk) * scale).softmax(-1)
    return torch.einsum("hk,khd->hd", p, vv)


def _sglang_decode(q, k, v, kv_indptr, kv_indices, scale):
    from sglang.kernels.ops.attention.decode_attention import decode_attention_fwd

    bs, splits = q.shape[0], 2
    o = torch.empty_like(q)
    logits = torch.empty(bs, QO, splits, D, dtype=torch.float32, device=q.device)
    lse = torch.empty(bs, QO, splits, dtype=torch.float32, device=q.device)
    decode_attention_fwd(q, k, v, o, kv_indptr, kv_indices, logits, lse,
                         torch.full((bs,), splits, dtype=torch.int32, device=q.device), splits, scale, 1.0, 1.0)
    return o


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_decode_reads_each_layers_kept_tokens(alpha, device):
    # Drawn on the CPU (the same numbers everywhere), run where the Triton kernels run (conftest).
    gen = torch.Generator().manual_seed(4)
    k = [torch.randn(SLOTS, KV, D, generator=gen).to(device) for _ in range(LAYERS)]
    v = [torch.randn(SLOTS, KV, D, generator=gen).to(device) for _ in range(LAYERS)]
    k0, v0 = [t.clone() for t in k], [t.clone() for t in v]
    req_to_token = torch.zeros(2, 64, dtype=torch.int32)
    req_to_token[1, : M + DECODED] = torch.randperm(SLOTS, generator=gen)[: M + DECODED].to(torch.int32)
    req_to_token = req_to_token.to(device)
    step = VLCacheCompression(CompressionConfig(compress_ratio=alpha))
    positions = step.query_positions(M, [IMAGE])
    queries = [(torch.randn(positions.numel(), QO, D, generator=gen) * 3).to(device) for _ in range(LAYERS)]
    scale = 1 / math.sqrt(D)
    result = step.run(PrefillView(1, M, 0, req_to_token, k, v, positions.to(device), queries, scale))

    table = KeptLengthTable(2, LAYERS, device)
    if result.kv_trimmed:
        table.set(1, result.plan)
    seq = torch.tensor([M + DECODED], device=device)
    kv_indptr, kv_indices = table.tables(req_to_token, torch.tensor([1], device=device), seq)
    q_decode = torch.randn(1, QO, D, generator=gen).to(device)
    row = req_to_token[1].long()
    tol = 1e-5 if device == "cpu" else 3e-3  # SGLang's kernel multiplies fp32 in TF32 on the GPU
    for layer in range(LAYERS):
        got = _sglang_decode(q_decode, k[layer], v[layer], kv_indptr[layer], kv_indices[layer], scale)
        kept = result.plan.kept_positions[layer] if result.kv_trimmed else torch.arange(M)
        want = _attend(q_decode[0], k0[layer], v0[layer], torch.cat([row[kept.to(device)], row[M: M + DECODED]]),
                       scale)
        torch.testing.assert_close(got[0], want, rtol=tol, atol=tol)
        if not result.kv_trimmed:  # alpha = 1: SGLang's own table, the full attention
            assert torch.equal(kv_indices[layer, : M + DECODED], req_to_token[1, : M + DECODED])
    if alpha < 1:
        assert result.kv_trimmed and max(result.plan.kept_lengths) < M
