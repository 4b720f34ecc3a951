"""The selective prefill's QueryObserver seam against SGLang's own forward (CPU, fp32 stand-in):
compression's capture of the post-vision queries gets the same Q (after M-RoPE) at every layer from
the reuse loop (which bypasses RadixAttention) as from SGLang's RadixAttention.forward, and a capture
whose voters are not all active stays incomplete (that request is then served uncompressed)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from standin import RequestSpec

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                reason="the stand-in is on the CPU: the Triton kernel needs TRITON_INTERPRET=1 there")

PREFIXED = RequestSpec(30, prefix_len=8, images=((12, 4, 4),))  # image tokens 12..27, text 28, 29
FRESH = RequestSpec(18, images=((3, 3, 4),))  # image tokens 3..14, text 15..17


def _runtime(standin, batch, voters):
    """A compression runtime whose pending capture wants `voters[i]` (absolute positions) of request i."""
    from vlcache_sglang.compression.config import CompressionConfig
    from vlcache_sglang.compression.query_capture import plan_capture
    from vlcache_sglang.compression.runtime import CompressionRuntime

    runtime = CompressionRuntime(lambda req: CompressionConfig(compress_ratio=0.2), standin.num_layers, 8, "cpu")
    specs = batch.requests
    wanted = [(row, spec.seq_len, torch.as_tensor(v)) for row, spec, v in zip(batch.req_rows, specs, voters)]
    runtime.pending = plan_capture([s.prefix_len for s in specs], [s.extend_len for s in specs], wanted, "cpu")
    return runtime


def _selective(standin, batch, sets, runtime):
    from sglang.srt.models.qwen2 import Qwen2Model

    from vlcache_sglang.model_patch.selective_prefill import SELECTIVE_ATTR, SelectiveBatch, SelectivePrefill

    class Fixed:
        def __init__(self, per_layer):
            self.sets = per_layer
            self.changed = [True] + [b.numel() != a.numel() for a, b in zip(per_layer, per_layer[1:])]
            self.layer_invariant = not any(self.changed[1:])
            self.probing = False

        def ready(self, layer):
            return True

    plans = [None if s is None else SimpleNamespace(selector=Fixed(s), report=None) for s in sets]
    fb = batch.forward_batch
    prefill = SelectivePrefill(standin.inv_freq)
    prefill.query_observer = runtime
    setattr(fb, SELECTIVE_ATTR, SelectiveBatch(plans, fb, standin.num_layers))
    try:
        with standin.forward_context():
            prefill.around_lm_forward(Qwen2Model.forward, standin.lm, batch.input_ids, batch.positions, fb)
    finally:
        setattr(fb, SELECTIVE_ATTR, None)


def test_the_reuse_loop_hands_over_the_queries_sglangs_attention_sees(standin, triton_attention, monkeypatch):
    from sglang.srt.layers.radix_attention import RadixAttention

    from vlcache_sglang.recompute_policy import PolicyParams, get_recompute_policy

    batch = standin.make_batch([PREFIXED, FRESH])
    voters = [torch.arange(28, 30), torch.arange(15, 18)]  # the text after each request's image
    before = standin.snapshot_kv()

    stock = _runtime(standin, batch, voters)
    real = RadixAttention.forward
    with monkeypatch.context() as patch:  # what compression's hook on RadixAttention.forward does
        patch.setattr(RadixAttention, "forward",
                      lambda attn, q, k, v, fb, *a, **kw: stock.capture_attention(real, attn, q, k, v, fb, *a, **kw))
        standin.stock_forward(batch)
    assert stock.pending.complete(standin.num_layers)
    standin.restore_kv(before)

    # The reuse loop under policy first_k (a shrinking-free set: text + each image's first 2 tokens;
    # the voters are text, so active), FRESH without a plan (every token).
    first_k = get_recompute_policy("first_k", PolicyParams(first_k=2)).plan(PREFIXED.token_layout(),
                                                                            standin.num_layers)
    ours = _runtime(standin, batch, voters)
    _selective(standin, batch, [None, None], ours)  # every token: SGLang's own forward, through the loop
    assert ours.pending.complete(standin.num_layers)
    for layer in range(standin.num_layers):
        torch.testing.assert_close(ours.pending.queries[layer], stock.pending.queries[layer], atol=1e-5, rtol=1e-5)
    standin.restore_kv(before)

    sub = _runtime(standin, batch, voters)
    _selective(standin, batch, [first_k, None], sub)
    assert sub.pending.complete(standin.num_layers)
    # Layer 0's Q depends on the token and its position only: equal to stock's even with reused KV.
    torch.testing.assert_close(sub.pending.queries[0], stock.pending.queries[0], atol=1e-5, rtol=1e-5)
    standin.restore_kv(before)

    # A voter inside the reused image (not active under first_k): nothing is taken, the request
    # is not compressed.
    inactive = _runtime(standin, batch, [torch.tensor([15, PREFIXED.seq_len - 1]), voters[1]])
    _selective(standin, batch, [first_k, None], inactive)
    assert not inactive.pending.complete(standin.num_layers) and not inactive.pending.queries
    standin.restore_kv(before)
    standin.free(batch)
