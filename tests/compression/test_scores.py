"""Per-layer scores and sparsity of a request, and which queries vote."""

from __future__ import annotations

import math

import pytest
import torch

from vlcache_sglang.compression.budget import layer_sparsity
from vlcache_sglang.compression.scores import post_vision_positions, score_layer, score_request
from vlcache_sglang.kernels.attention_scores_reference import post_vision_scores_reference


def test_post_vision_queries_are_the_text_after_the_last_image():
    # Images at [3, 10] and [12, 20] (ends inclusive), 26 prompt tokens: queries 21..25.
    assert post_vision_positions(26, [(3, 10), (12, 20)]).tolist() == [21, 22, 23, 24, 25]
    assert post_vision_positions(26, [(12, 20), (3, 10)], max_queries=2).tolist() == [24, 25]


def test_without_text_after_the_image_or_without_image_the_tail_votes():
    assert post_vision_positions(10, [(2, 9)], fallback_queries=3).tolist() == [7, 8, 9]
    assert post_vision_positions(10, [], fallback_queries=4).tolist() == [6, 7, 8, 9]
    assert post_vision_positions(2, [], fallback_queries=4).tolist() == [0, 1]
    assert post_vision_positions(1, [(0, 0)]).tolist() == [0]


def test_post_vision_contract():
    with pytest.raises(ValueError, match="past the prompt"):
        post_vision_positions(10, [(2, 10)])
    with pytest.raises(ValueError, match="> 0"):
        post_vision_positions(0, [])


def _layers(num_layers, m, tau, seed=0, device="cpu"):
    """Drawn on the CPU (the same numbers everywhere), moved to where the Triton kernel runs."""
    gen = torch.Generator().manual_seed(seed)
    slots = 40
    k = [torch.randn(slots, 2, 16, generator=gen).to(device) for _ in range(num_layers)]
    q = [(torch.randn(tau, 4, 16, generator=gen) * (1 + 2 * layer)).to(device) for layer in range(num_layers)]
    req_to_token = torch.randperm(slots, generator=gen)[: 2 * 20].reshape(2, 20).to(device, torch.int32)
    return q, k, req_to_token


def test_score_request_kernel_equals_reference_per_layer(device):
    m, tau = 17, 4
    q, k, req_to_token = _layers(3, m, tau, device=device)
    positions = post_vision_positions(m, [(2, 12)]).to(device)
    assert positions.numel() == tau
    got = score_request(q, k, req_to_token, 1, positions, m, 1 / math.sqrt(16))
    want = score_request(q, k, req_to_token, 1, positions, m, 1 / math.sqrt(16),
                         scorer=post_vision_scores_reference)
    assert len(got) == 3
    for g, w in zip(got, want):
        torch.testing.assert_close(g.token_scores, w.token_scores, rtol=1e-5, atol=1e-5)
        assert torch.equal(g.sparse_counts, w.sparse_counts)
        assert g.sparsity == pytest.approx(layer_sparsity(w.sparse_counts, positions))
    # Sharper queries (larger q at deeper layers here) make sparser attention.
    assert got[0].sparsity < got[2].sparsity


def test_score_layer_matches_a_materialised_matrix(device):
    """gamma_l recomputed by hand from the full softmax of a small layer."""
    m, tau = 9, 3
    q, k, req_to_token = _layers(1, m, tau, seed=2, device=device)
    positions = torch.arange(m - tau, m, device=device)
    got = score_layer(q[0], k[0], req_to_token, 0, positions, m, 0.25)
    keys = k[0][req_to_token[0, :m].long()].repeat_interleave(2, dim=1)
    logits = torch.einsum("qhd,khd->hqk", q[0], keys) * 0.25
    visible = torch.arange(m, device=device)[None, :] <= positions[:, None]
    probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
    frac = ((probs < 0.01 * probs.amax(-1, keepdim=True)) & visible).sum(-1) / visible.sum(-1)
    assert got.sparsity == pytest.approx(float(frac.mean()), abs=1e-9)
    torch.testing.assert_close(got.token_scores, probs.sum((0, 1)), rtol=1e-5, atol=1e-5)


def test_one_query_tensor_per_layer():
    q, k, req_to_token = _layers(2, 9, 2)
    with pytest.raises(ValueError, match="per layer"):
        score_request(q[:1], k, req_to_token, 0, torch.tensor([7, 8]), 9, 0.25)
