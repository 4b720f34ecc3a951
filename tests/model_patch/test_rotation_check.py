"""The live rotation check compares exactly the reused tokens layer 0 recomputes (CPU)."""

import logging

import torch

from vlcache_sglang.layer_selector import LayerSelector
from vlcache_sglang.model_patch.rotation_check import RotationCheck, recomputed_slots
from vlcache_sglang.recompute_policy import ImageSpan, PolicyParams, TokenLayout, get_recompute_policy
from vlcache_sglang.reuse_planner import RequestReuse


def _plan(policy_name: str, dst: torch.Tensor) -> RequestReuse:
    layout = TokenLayout(seq_len=20, prefix_len=0, images=(ImageSpan(3, 4, reused=True), ImageSpan(10, 4, reused=True)))
    policy = get_recompute_policy(policy_name, PolicyParams(first_k=2))
    empty = torch.empty(0, dtype=torch.long)
    return RequestReuse(0, 20, layout, LayerSelector(policy, layout, 2), empty, dst, empty)


def test_slots_follow_the_policy_layer_0_set():
    dst = torch.arange(100, 108)
    assert recomputed_slots([_plan("full", dst)]).tolist() == dst.tolist()
    assert recomputed_slots([_plan("first_k", dst), None]).tolist() == [100, 101, 104, 105]
    assert recomputed_slots([_plan("none", dst)]).numel() == 0


def test_compare_reports_the_difference_the_forward_made(caplog):
    from kv_pool import make_kv_pool

    pool, _ = make_kv_pool(16, 2, 2, 4, "cpu")
    dst = torch.arange(4, 12)
    check = RotationCheck(pool, [_plan("full", dst)])
    with caplog.at_level(logging.INFO):
        assert check.compare() == 0.0  # nothing wrote over the slots
        pool.get_key_buffer(0)[6] += 0.5  # a "fresh" K that differs from the rotated one
        assert abs(check.compare() - 0.5) < 1e-6
    assert "rotation check" in caplog.text
    assert RotationCheck(pool, [_plan("none", dst)]).compare() is None
