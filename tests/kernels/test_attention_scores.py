"""Post-vision attention scores (two passes over the paged K): equal to the torch reference."""

from __future__ import annotations

import math

import pytest
import torch

from vlcache_sglang.kernels.attention_scores import post_vision_scores
from vlcache_sglang.kernels.attention_scores_reference import post_vision_scores_reference

TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}
ROW = 2  # the request's req_to_token row


def _request(m, tau, qo_heads, kv_heads, head_dim, dtype, device, seed=0, slots=None, sharp=3.0):
    """A pool whose request row maps its m keys to scattered slots (others poisoned with NaN), and tau
    post-vision queries at the last tau positions. Logits have standard deviation `sharp`: rows
    mix entries above and below 1 % of their maximum (ln 100 = 4.6 below it)."""
    gen = torch.Generator().manual_seed(seed)
    slots = slots or 2 * m + 16
    k = torch.randn(slots, kv_heads, head_dim, generator=gen)
    req_to_token = torch.zeros(4, m + 8, dtype=torch.int32)
    perm = torch.randperm(slots, generator=gen)
    req_to_token[ROW, :m] = perm[:m].to(torch.int32)
    req_to_token[ROW, m:] = perm[m: m + 8].to(torch.int32)  # past the prompt: never read either
    poison = torch.ones(slots, dtype=torch.bool)
    poison[req_to_token[ROW, :m].long()] = False
    k[poison] = float("nan")
    q = torch.randn(tau, qo_heads, head_dim, generator=gen) * sharp
    positions = torch.arange(m - tau, m)
    return (q.to(device=device, dtype=dtype), k.to(device=device, dtype=dtype),
            req_to_token.to(device), positions.to(device))


def _both(q, k, req_to_token, positions, m, **kw):
    scale = 1 / math.sqrt(q.shape[-1])
    got = post_vision_scores(q, k, req_to_token, ROW, positions, m, scale, **kw)
    want = post_vision_scores_reference(q, k, req_to_token, ROW, positions, m, scale)
    return got, want


def _assert_counts_close(got, want, valid_entries, frac):
    """Entries whose ratio to the row max lies at the threshold may fall either side in low precision."""
    diff = int((got.long() - want.long()).abs().sum())
    assert diff <= max(2, frac * valid_entries), f"{diff=} of {valid_entries} valid entries"


# m = 1: a one-token prompt; 37: odd, crosses 16-key blocks; 1000: many blocks and splits.
@pytest.mark.parametrize("m, tau", [(1, 1), (37, 5), (37, 37), (1000, 13)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("qo_heads, kv_heads, head_dim", [(4, 2, 64), (7, 1, 32), (2, 2, 80)])
def test_kernel_matches_reference(m, tau, dtype, qo_heads, kv_heads, head_dim, device):
    q, k, req_to_token, positions = _request(m, tau, qo_heads, kv_heads, head_dim, dtype, device)
    (scores, sparse), (want_scores, want_sparse) = _both(q, k, req_to_token, positions, m, block_rows=16,
                                                         block_n=16, num_splits=3)
    assert scores.shape == (m,) and scores.dtype == torch.float32
    assert sparse.shape == (tau, qo_heads) and sparse.dtype == torch.int32
    assert torch.isfinite(scores).all()
    torch.testing.assert_close(scores, want_scores, rtol=TOL[dtype], atol=TOL[dtype] * tau * qo_heads ** 0.5)
    # Every (query, head) row is a distribution: the scores sum to tau x heads.
    assert math.isclose(float(scores.sum()), tau * qo_heads, rel_tol=1e-4)
    valid = int((positions + 1).sum()) * qo_heads
    _assert_counts_close(sparse, want_sparse, valid, 0.0 if dtype == torch.float32 else 2e-3)
    # The row maximum itself is never sparse.
    assert bool((sparse.long() < (positions + 1)[:, None]).all())


@pytest.mark.parametrize("num_splits", [1, 2, 7])
def test_splits_and_blocks_do_not_change_the_result(num_splits, device):
    q, k, req_to_token, positions = _request(200, 9, 4, 2, 64, torch.float32, device, seed=3)
    (scores, sparse), (want_scores, want_sparse) = _both(q, k, req_to_token, positions, 200,
                                                         num_splits=num_splits, block_rows=32, block_n=32)
    valid = int((positions + 1).sum()) * 4
    assert 0.2 * valid < int(want_sparse.sum()) < 0.95 * valid  # a meaningful mix of sparse and dense
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse, want_sparse)


def test_default_blocks_and_strided_q(device):
    """The defaults and q a view into a fused qkv tensor (Qwen2.5-VL-7B heads: 28 qo, 4 kv, 128)."""
    m, tau = 70, 11
    _, k, req_to_token, positions = _request(m, tau, 28, 4, 128, torch.bfloat16, device, seed=4)
    gen = torch.Generator().manual_seed(9)
    qkv = torch.randn(tau, (28 + 8) * 128, generator=gen).to(device=device, dtype=torch.bfloat16)
    q = qkv[:, : 28 * 128].view(tau, 28, 128)
    assert not q.is_contiguous()
    (scores, sparse), (want_scores, want_sparse) = _both(q, k, req_to_token, positions, m)
    torch.testing.assert_close(scores, want_scores, rtol=2e-2, atol=5e-2)
    _assert_counts_close(sparse, want_sparse, int((positions + 1).sum()) * 28, 2e-3)


def test_queries_anywhere_see_only_their_causal_keys(device):
    """Queries need not be the last tau tokens: query at position 0 puts all its mass on key 0."""
    q, k, req_to_token, _ = _request(50, 4, 2, 1, 32, torch.float32, device, seed=5)
    positions = torch.tensor([0, 20, 21, 49], device=device)
    (scores, sparse), (want_scores, want_sparse) = _both(q, k, req_to_token, positions, 50, block_rows=16,
                                                         block_n=16)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(sparse, want_sparse)
    assert int(sparse[0].sum()) == 0  # one visible entry: it is the row max
    scores_first, _ = post_vision_scores(q[:1], k, req_to_token, ROW, positions[:1], 50, 0.1)
    assert float(scores_first[0]) == pytest.approx(2.0) and float(scores_first[1:].abs().sum()) == 0.0


def test_uniform_keys_have_no_sparse_entries(device):
    """Equal logits: every entry equals the row max, none is below 1 % of it; scores count visibility."""
    m, tau = 30, 3
    q = torch.zeros(tau, 2, 16, device=device)
    k = torch.randn(40, 2, 16, device=device)
    req_to_token = torch.arange(4 * 40, dtype=torch.int32, device=device).reshape(4, 40) % 40
    positions = torch.arange(m - tau, m, device=device)
    scores, sparse = post_vision_scores(q, k, req_to_token, ROW, positions, m, 0.25, block_rows=16, block_n=16)
    assert int(sparse.sum()) == 0
    want = sum(2 * (torch.arange(m, device=device) <= p).float() / (int(p) + 1) for p in positions)
    torch.testing.assert_close(scores, want)


def test_empty_query_set(device):
    _, k, req_to_token, _ = _request(10, 1, 2, 2, 16, torch.float32, device)
    scores, sparse = post_vision_scores(torch.empty(0, 2, 16, device=device), k, req_to_token, ROW,
                                        torch.empty(0, dtype=torch.int64, device=device), 10, 0.25)
    assert scores.tolist() == [0.0] * 10 and sparse.shape == (0, 2)


def test_contract_errors(device):
    q, k, req_to_token, positions = _request(10, 2, 4, 2, 16, torch.float32, device)
    with pytest.raises(ValueError, match="num_keys"):
        post_vision_scores(q, k, req_to_token, ROW, positions + 1, 10, 0.25)
    with pytest.raises(ValueError, match="multiple"):
        post_vision_scores(q[:, :3], k, req_to_token, ROW, positions, 10, 0.25)
    with pytest.raises(NotImplementedError, match="share"):
        post_vision_scores(q.half(), k, req_to_token, ROW, positions, 10, 0.25)
    with pytest.raises(ValueError, match="int32"):
        post_vision_scores(q, k, req_to_token.long(), ROW, positions, 10, 0.25)
    with pytest.raises(ValueError, match="power of two"):
        post_vision_scores(q, k, req_to_token, ROW, positions, 10, 0.25, block_n=24)


@pytest.mark.gpu
def test_gpu_long_prompt_matches_reference():
    """A 7B-shaped layer over a 16K-token prompt with split-KV chosen for the GPU."""
    q, k, req_to_token, positions = _request(16_384, 64, 28, 4, 128, torch.bfloat16, "cuda", seed=7)
    (scores, sparse), (want_scores, want_sparse) = _both(q, k, req_to_token, positions, 16_384)
    torch.testing.assert_close(scores, want_scores, rtol=2e-2, atol=2e-2)
    _assert_counts_close(sparse, want_sparse, int((positions + 1).sum()) * 28, 2e-3)


def _compiled_variants(kernel) -> int:
    """Binaries Triton holds for `kernel` on the current GPU (one per specialisation key)."""
    return len(kernel.device_caches[torch.cuda.current_device()][0])


@pytest.mark.gpu
def test_gpu_one_compiled_variant_for_every_request_shape():
    """Query counts, prompt lengths and request rows of every value class (1, multiples of 16, odd)
    reuse the binary the first shape compiled: a new request shape compiles nothing inside its TTFT.
    (Counted after the first call: other tests in the session compile other head/dtype variants.)"""
    from vlcache_sglang.kernels import attention_scores as mod

    counts = []
    for tau, m, row in [(1, 33, ROW), (16, 64, ROW), (5, 1000, ROW), (32, 4096, 1), (3, 517, 3)]:
        q, k, req_to_token, positions = _request(m, tau, 28, 4, 128, torch.bfloat16, "cuda", seed=tau)
        req_to_token = req_to_token.roll(row - ROW, 0)  # the request's row at index `row`
        post_vision_scores(q, k, req_to_token, row, positions, m, 1 / math.sqrt(128))
        counts.append((_compiled_variants(mod._row_stats_kernel), _compiled_variants(mod._scores_kernel)))
    assert all(c == counts[0] for c in counts), counts


@pytest.mark.gpu
def test_gpu_compile_for_builds_the_binary_requests_run():
    """After start-up's compile_for, a request of another shape on a pool of that layer shape (a row of a
    wider req_to_token, odd prompt length, one query) compiles nothing more."""
    from vlcache_sglang.kernels import attention_scores as mod

    pool_k = torch.zeros(8, 2, 96, dtype=torch.float16, device="cuda")  # a head shape no other test uses
    mod.compile_for(6, pool_k)
    before = (_compiled_variants(mod._row_stats_kernel), _compiled_variants(mod._scores_kernel))
    q, k, req_to_token, positions = _request(301, 1, 6, 2, 96, torch.float16, "cuda")
    post_vision_scores(q, k, req_to_token, ROW, positions, 301, 96 ** -0.5)
    assert (_compiled_variants(mod._row_stats_kernel), _compiled_variants(mod._scores_kernel)) == before
