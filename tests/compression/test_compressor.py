"""The VL-Cache post-prefill step end to end on CPU: scores -> budgets -> kept sets -> compacted pool."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from vlcache_sglang.compression.compressor import VLCacheCompression, build_post_prefill_step
from vlcache_sglang.compression.config import CompressionConfig
from vlcache_sglang.compression.step import PrefillView, is_kv_trimmed, mark_kv_trimmed, trimmed_plan
from vlcache_sglang.kernels.attention_scores_reference import post_vision_scores_reference

M, IMAGE = 60, (4, 49)  # prompt tokens; one image at positions 4..49 (inclusive); text 50..59 votes
LAYERS, QO, KV, D = 3, 4, 2, 16


def _view(step, seed=0, prefix=0, sharpness=(0.5, 3.0, 6.0), device="cpu"):
    """A request in a small pool; layer l's queries scaled by sharpness[l] (denser -> sparser). Drawn on
    the CPU (the same numbers everywhere), then moved to `device`."""
    gen = torch.Generator().manual_seed(seed)
    slots = 2 * M + 8
    k = [torch.randn(slots, KV, D, generator=gen) for _ in range(LAYERS)]
    v = [torch.randn(slots, KV, D, generator=gen) for _ in range(LAYERS)]
    req_to_token = torch.zeros(3, M + 16, dtype=torch.int32)
    req_to_token[1] = torch.randperm(slots, generator=gen)[: M + 16].to(torch.int32)
    positions = step.query_positions(M, [IMAGE])
    queries = [torch.randn(positions.numel(), QO, D, generator=gen) * s for s in sharpness]
    k, v, queries = ([t.to(device) for t in ts] for ts in (k, v, queries))
    return PrefillView(1, M, prefix, req_to_token.to(device), k, v, positions.to(device), queries, 1 / math.sqrt(D))


def _step(**cfg):
    return VLCacheCompression(CompressionConfig(**cfg), scorer=post_vision_scores_reference)


def test_off_by_default():
    assert build_post_prefill_step(CompressionConfig()) is None
    assert isinstance(build_post_prefill_step(CompressionConfig(compress_ratio=0.1)), VLCacheCompression)
    with pytest.raises(ValueError, match="compress_ratio"):
        VLCacheCompression(CompressionConfig())


def test_post_vision_text_votes():
    assert _step(compress_ratio=0.2).query_positions(M, [IMAGE]).tolist() == list(range(50, 60))


def test_alpha_one_leaves_the_kv_untouched():
    step = _step(compress_ratio=1.0)
    view = _view(step)
    before = [t.clone() for t in view.k_buffers]
    result = step.run(view)
    assert not result.kv_trimmed and result.plan is None
    assert all(torch.equal(a, b) for a, b in zip(before, view.k_buffers))


def test_compression_keeps_budgets_and_the_kv_each_layer_reads():
    step = _step(compress_ratio=0.3)
    view = _view(step)
    row = view.row_slots.long().clone()
    k0 = [t.clone() for t in view.k_buffers]
    result = step.run(view)
    plan, info = result.plan, result.info
    assert result.kv_trimmed
    # Sparser layers (sharper queries) get smaller budgets, and the budgets follow the formula.
    gamma = info["sparsity"]
    assert gamma[0] < gamma[1] < gamma[2]
    dens = [1 - g for g in gamma]
    want = [min(1.0, max(0.01, 0.3 * LAYERS * d / sum(dens))) for d in dens]
    assert info["budgets"] == pytest.approx(want)
    assert info["kept"] == [max(math.floor(b * M + 1e-9), 10) for b in want]
    assert plan.kept_lengths == info["kept"]
    for layer, kept in enumerate(plan.kept_positions):
        assert set(range(50, 60)) <= set(kept.tolist())  # the voting text always stays
        assert torch.equal(view.k_buffers[layer][plan.kv_indices[layer]], k0[layer][row[kept]])
    assert plan.free_slots.tolist() == row[plan.retained_len:].tolist()
    assert info["freed"] == M - max(info["kept"])
    assert plan.table_lengths == info["kept"]  # no prefix: each table is row[0 : kept_l]


def test_uniform_baseline_keeps_alpha_m_at_every_layer():
    step = _step(compress_ratio=0.3, budget="uniform")
    result = step.run(_view(step))
    assert result.info["kept"] == [18, 18, 18]
    assert result.plan.retained_len == 18


def test_recent_window_and_shared_prefix():
    step = _step(compress_ratio=0.05, recent_window=15)
    view = _view(step, prefix=6)
    row = view.row_slots.long().clone()
    k0 = [t.clone() for t in view.k_buffers]
    plan = step.run(view).plan
    for layer, kept in enumerate(plan.kept_positions):
        assert set(range(45, 60)) <= set(kept.tolist())
        # The tree's prefix is kept whole at every layer, its slots and KV untouched; nothing freed there.
        assert kept[:6].tolist() == list(range(6))
        assert torch.equal(view.k_buffers[layer][row[:6]], k0[layer][row[:6]])
        assert plan.kv_indices[layer].tolist() == row[: plan.table_lengths[layer]].tolist()
    assert not set(plan.free_slots.tolist()) & set(row[:6].tolist())
    # alpha = 0.05 of the 54 own tokens is 2: the 15-token window wins at every layer.
    assert plan.table_lengths == [6 + 15] * LAYERS


def test_sink_tokens_are_kept_at_every_layer_and_count_against_the_budget():
    step = _step(compress_ratio=0.05, recent_window=15, sink_tokens=4)
    plan = step.run(_view(step)).plan
    for kept in plan.kept_positions:
        assert kept[:4].tolist() == [0, 1, 2, 3] and set(range(45, 60)) <= set(kept.tolist())
    assert plan.table_lengths == [4 + 15] * LAYERS  # alpha 0.05 of 60 is 3: the sinks and the window win
    # Inside a shared prefix the sinks are the tree's already: only the window is added.
    step = _step(compress_ratio=0.05, recent_window=15, sink_tokens=4)
    assert step.run(_view(step, prefix=6)).plan.table_lengths == [6 + 15] * LAYERS


def test_trimmed_flag_and_release_slots():
    step = _step(compress_ratio=0.3)
    view = _view(step)
    plan = step.run(view).plan
    req = SimpleNamespace()
    assert not is_kv_trimmed(req)
    mark_kv_trimmed(req, plan)
    assert is_kv_trimmed(req) and trimmed_plan(req) is plan
    with pytest.raises(RuntimeError, match="already trimmed"):
        mark_kv_trimmed(req, plan)
    # 5 decode tokens later: free the retained prompt slots and the decode slots, never the freed tail.
    row = view.req_to_token[1]
    release = plan.slots_to_free_on_finish(row, M + 5)
    assert release.tolist() == row[: plan.retained_len].tolist() + row[M: M + 5].tolist()
    assert not set(release.tolist()) & set(plan.free_slots.tolist())
    with pytest.raises(ValueError, match="kv_len"):
        plan.slots_to_free_on_finish(row, M - 1)


def test_a_layer_cap_bounds_every_layers_kept_tokens_and_frees_the_rest():
    uncapped = _step(compress_ratio=0.3).run(_view(_step(compress_ratio=0.3))).plan
    capped_step = _step(compress_ratio=0.3, max_budget=0.35)
    plan = capped_step.run(_view(capped_step)).plan
    assert max(uncapped.kept_lengths) > 0.35 * M, "the example needs a layer above the cap"
    assert max(plan.kept_lengths) <= math.floor(0.35 * M) + 1e-9
    assert plan.free_slots.numel() == M - max(plan.kept_lengths) > uncapped.free_slots.numel()


def test_the_uniform_share_reaches_the_steps_budgets():
    """--vlcache-compress-uniform-share: the step's budgets are the mix (1: uniform's, 0: the paper's)."""
    steps = {s: _step(compress_ratio=0.3, uniform_share=s) for s in (0.0, 0.5, 1.0)}
    info = {s: step.run(_view(step)).info for s, step in steps.items()}
    paper = torch.tensor(info[0.0]["budgets"], dtype=torch.float64)
    assert float(paper.max() - paper.min()) > 0.01, "the example needs layers of different sparsity"
    assert info[1.0]["budgets"] == pytest.approx([0.3] * len(paper))
    assert info[0.5]["budgets"] == pytest.approx((0.5 * 0.3 + 0.5 * paper).tolist())


def test_kernel_and_reference_scorers_pick_the_same_tokens(device):
    # The Triton scorer runs where Triton does: the GPU, or the CPU under TRITON_INTERPRET=1 (conftest).
    kernel_step = VLCacheCompression(CompressionConfig(compress_ratio=0.3))
    ref_step = _step(compress_ratio=0.3)
    got = kernel_step.run(_view(kernel_step, seed=3, device=device)).plan
    want = ref_step.run(_view(ref_step, seed=3)).plan
    assert [k.tolist() for k in got.kept_positions] == [k.tolist() for k in want.kept_positions]


def test_view_contract():
    step = _step(compress_ratio=0.3)
    view = _view(step)
    with pytest.raises(ValueError, match="one K, V and query"):
        PrefillView(1, M, 0, view.req_to_token, view.k_buffers, view.v_buffers[:2], view.query_positions,
                    view.queries, 0.25)
    with pytest.raises(ValueError, match="queries must be"):
        PrefillView(1, M, 0, view.req_to_token, view.k_buffers, view.v_buffers, view.query_positions[:3],
                    view.queries, 0.25)
