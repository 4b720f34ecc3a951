"""Kept-token selection and the compaction plan: top-k with a protected tail, per-layer slot
tables, frees, and the K/V each layer reads after compaction (properties)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vlcache_sglang.compression.selection import (apply_compaction, plan_compaction, select_kept_positions,
                                                  select_layers)


@st.composite
def scored(draw):
    m = draw(st.integers(1, 60))
    values = draw(st.lists(st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.5]) | st.floats(0, 10), min_size=m, max_size=m))
    return torch.tensor(values, dtype=torch.float32), draw(st.integers(0, m + 3)), draw(st.integers(0, m + 3))


@given(case=scored())
@settings(max_examples=300, deadline=None)
def test_selection_is_top_k_plus_the_tail(case):
    scores, count, tail = case
    m = scores.numel()
    kept = select_kept_positions(scores, count, tail)
    tail = min(tail, m)
    assert kept.dtype == torch.int64 and kept.numel() == min(max(count, tail), m)
    assert bool((kept[1:] > kept[:-1]).all())  # sorted, unique
    assert set(range(m - tail, m)) <= set(kept.tolist())  # the tail always survives
    chosen = [j for j in kept.tolist() if j < m - tail]
    dropped = [j for j in range(m - tail) if j not in set(chosen)]
    if chosen and dropped:  # every chosen head token scores at least every dropped one
        assert min(float(scores[j]) for j in chosen) >= max(float(scores[j]) for j in dropped)
        # ties go to the earlier position
        lowest = min(float(scores[j]) for j in chosen)
        assert all(j > max(c for c in chosen if float(scores[c]) == lowest)
                   for j in dropped if float(scores[j]) == lowest)


def test_selection_examples():
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 0.0, 9.0])
    assert select_kept_positions(scores, 4, protected_tail=2).tolist() == [1, 3, 5, 6]
    assert select_kept_positions(scores, 1, protected_tail=2).tolist() == [5, 6]  # the tail wins over count
    assert select_kept_positions(scores, 99, protected_tail=0).tolist() == list(range(7))
    assert select_kept_positions(scores, 0, protected_tail=0).tolist() == []
    assert select_kept_positions(torch.tensor([1.0]), 0, protected_tail=1).tolist() == [0]  # m = 1


@given(case=scored(), head=st.integers(0, 8))
@settings(max_examples=200, deadline=None)
def test_protected_head_is_kept_and_counts_against_the_budget(case, head):
    scores, count, tail = case
    m = scores.numel()
    kept = select_kept_positions(scores, count, tail, protected_head=head).tolist()
    tail, head = min(tail, m), min(head, m - min(tail, m))
    assert len(kept) == min(max(count, head + tail), m)
    assert set(range(head)) | set(range(m - tail, m)) <= set(kept)
    middle = [j for j in range(head, m - tail)]
    chosen = [j for j in kept if j in middle]
    dropped = [j for j in middle if j not in set(kept)]
    if chosen and dropped:
        assert min(float(scores[j]) for j in chosen) >= max(float(scores[j]) for j in dropped)


def test_protected_head_examples():
    scores = torch.tensor([0.1, 5.0, 0.2, 3.0, 0.0, 0.0, 9.0])
    assert select_kept_positions(scores, 4, protected_tail=2, protected_head=1).tolist() == [0, 1, 5, 6]
    assert select_kept_positions(scores, 0, protected_tail=0, protected_head=2).tolist() == [0, 1]
    assert select_kept_positions(scores, 0, protected_tail=5, protected_head=5).tolist() == list(range(7))


def test_selection_refuses_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="NaN"):
        select_kept_positions(torch.tensor([1.0, float("nan")]), 1, 0)
    with pytest.raises(ValueError, match="1-D"):
        select_kept_positions(torch.zeros(2, 2), 1, 0)
    with pytest.raises(ValueError, match="one count per layer"):
        select_layers([torch.zeros(3)], [1, 2], 0)


@st.composite
def requests(draw):
    """A request of m prompt tokens at scattered slots, its shared prefix p, per-layer kept sets."""
    m = draw(st.integers(1, 40))
    p = draw(st.integers(0, m))
    layers = draw(st.integers(1, 4))
    kept = [sorted(draw(st.sets(st.integers(0, m - 1), max_size=m))) for _ in range(layers)]
    seed = draw(st.integers(0, 2**16))
    return m, p, kept, seed


def _pool(layers, slots, seed):
    gen = torch.Generator().manual_seed(seed)
    k = [torch.randn(slots, 2, 8, generator=gen) for _ in range(layers)]
    v = [torch.randn(slots, 2, 8, generator=gen) for _ in range(layers)]
    return k, v


@given(case=requests())
@settings(max_examples=200, deadline=None)
def test_compaction_keeps_what_each_layer_attends(case):
    m, p, kept, seed = case
    slots = 2 * m + 5
    row = torch.randperm(slots, generator=torch.Generator().manual_seed(seed))[:m]
    k, v = _pool(len(kept), slots, seed)
    k0, v0 = [t.clone() for t in k], [t.clone() for t in v]
    plan = plan_compaction(row, [torch.tensor(s, dtype=torch.int64) for s in kept], p)
    apply_compaction(k, v, plan)

    own = [sum(1 for j in s if j >= p) for s in kept]
    assert plan.retained_len == p + max(own)
    assert plan.kept_lengths == [len(s) for s in kept]
    # What layer l reads through its table is, token for token, the K/V of its kept positions.
    for layer, s in enumerate(kept):
        want = row[torch.tensor(s, dtype=torch.int64)]
        assert torch.equal(k[layer][plan.kv_indices[layer]], k0[layer][want])
        assert torch.equal(v[layer][plan.kv_indices[layer]], v0[layer][want])
        # Tables only name prefix slots or retained own slots, never a freed one.
        table = set(plan.kv_indices[layer].tolist())
        assert table <= set(row[: plan.retained_len].tolist())
        assert not table & set(plan.free_slots.tolist())
    # A whole prefix at every layer makes each table one range of the row.
    if all(set(range(p)) <= set(s) for s in kept):
        assert plan.table_lengths == [p + n for n in own]
        assert all(t.tolist() == row[:n].tolist() for t, n in zip(plan.kv_indices, plan.table_lengths))
    else:
        assert plan.table_lengths is None
    # Freed: exactly the own slots past the retained ones; the tree's prefix slots are untouched.
    assert plan.free_slots.tolist() == row[plan.retained_len:].tolist()
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[row[p: plan.retained_len]] = False
    for layer in range(len(kept)):
        assert torch.equal(k[layer][untouched], k0[layer][untouched])
        assert torch.equal(v[layer][untouched], v0[layer][untouched])


def test_keeping_everything_moves_and_frees_nothing():
    row = torch.tensor([7, 3, 9, 1, 4])
    plan = plan_compaction(row, [torch.arange(5)] * 3, shared_prefix_len=2)
    assert plan.retained_len == 5 and plan.free_slots.numel() == 0
    assert all(src.numel() == 0 for src, _ in plan.copies)
    assert all(t.tolist() == row.tolist() for t in plan.kv_indices)


def test_worked_example():
    # m = 6, prefix p = 2 (slots 10, 11 belong to the tree); own slots 12..15 at positions 2..5.
    row = torch.tensor([10, 11, 12, 13, 14, 15])
    plan = plan_compaction(row, [torch.tensor([0, 3, 5]), torch.tensor([4, 5])], shared_prefix_len=2)
    assert plan.kv_indices[0].tolist() == [10, 12, 13]  # prefix 0 in place; 3 -> slot 12, 5 -> slot 13
    assert plan.kv_indices[1].tolist() == [12, 13]
    assert [(s.tolist(), d.tolist()) for s, d in plan.copies] == [([13, 15], [12, 13]), ([14, 15], [12, 13])]
    assert plan.retained_len == 4 and plan.free_slots.tolist() == [14, 15]
    assert plan.table_lengths is None  # layer 1 drops prefix position 0 and 1: no contiguous table
    whole = plan_compaction(row, [torch.tensor([0, 1, 3, 5]), torch.tensor([0, 1, 4])], shared_prefix_len=2)
    assert whole.table_lengths == [4, 3]
    assert [t.tolist() for t in whole.kv_indices] == [[10, 11, 12, 13], [10, 11, 12]]


def test_compaction_on_sglang_pool():
    """The same on SGLang's own MHATokenToKVPool, with its allocator taking the freed slots back."""
    from kv_pool import make_kv_pool

    pool, allocator = make_kv_pool(64, layers=3, heads=2, dim=8, device="cpu")
    slots = allocator.alloc(20)
    before = allocator.available_size()
    k0 = [t.clone() for t in pool.k_buffer]
    kept = [torch.tensor([1, 5, 19]), torch.arange(0, 20, 2), torch.tensor([19])]
    plan = plan_compaction(slots, kept, shared_prefix_len=0)
    apply_compaction(pool.k_buffer, pool.v_buffer, plan)
    allocator.free(plan.free_slots)
    assert allocator.available_size() == before + 20 - 10
    for layer, s in enumerate(kept):
        assert torch.equal(pool.k_buffer[layer][plan.kv_indices[layer]], k0[layer][slots[s].long()])


def test_plan_contract():
    row = torch.arange(4)
    with pytest.raises(ValueError, match="sorted"):
        plan_compaction(row, [torch.tensor([2, 1])], 0)
    with pytest.raises(ValueError, match="sorted"):
        plan_compaction(row, [torch.tensor([4])], 0)
    with pytest.raises(ValueError, match="shared_prefix_len"):
        plan_compaction(row, [torch.tensor([0])], 5)
