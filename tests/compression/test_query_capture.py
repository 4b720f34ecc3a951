"""Which Q rows a prefill batch keeps for the post-prefill step, and the rows it keeps (CPU)."""

from types import SimpleNamespace

import pytest
import torch

from vlcache_sglang.compression.query_capture import plan_capture


def test_rows_follow_the_extend_layout_and_only_the_last_chunk_votes():
    # Request 0: a whole prompt of 10; request 1: untouched; request 2: last chunk [20, 30) of a 30-token
    # prompt whose voting positions start in an earlier chunk (18, 19 are dropped).
    wanted = [(5, 10, torch.tensor([7, 8, 9])), None, (6, 30, torch.arange(18, 30))]
    capture = plan_capture([0, 0, 20], [10, 4, 10], wanted, "cpu")
    assert [r.req_pool_idx for r in capture.requests] == [5, 6]
    assert capture.requests[1].positions.tolist() == list(range(20, 30))
    assert capture.rows.tolist() == [7, 8, 9] + list(range(14, 24))
    assert [r.start for r in capture.requests] == [0, 3]


def test_nothing_wanted_is_no_capture_and_a_chunk_that_does_not_end_the_prompt_is_refused():
    assert plan_capture([0], [8], [None], "cpu") is None
    assert plan_capture([8], [8], [(1, 16, torch.tensor([3]))], "cpu") is None  # its voters lie in chunk 1
    with pytest.raises(ValueError, match="does not end the prompt"):
        plan_capture([0], [8], [(1, 16, torch.tensor([15]))], "cpu")


def test_take_keeps_each_layers_rows_and_knows_when_it_is_complete():
    capture = plan_capture([0, 0], [4, 6], [(1, 4, torch.tensor([3])), (2, 6, torch.tensor([4, 5]))], "cpu")
    fb = SimpleNamespace(extend_prefix_lens_cpu=[0, 0], extend_seq_lens_cpu=[4, 6])
    assert capture.matches(fb)
    assert not capture.matches(SimpleNamespace(extend_prefix_lens_cpu=[0], extend_seq_lens_cpu=[10]))
    heads, dim = 2, 3
    qs = [torch.randn(10, heads * dim) for _ in range(2)]
    capture.take(0, qs[0], heads, dim, 0.5)
    assert not capture.complete(2)
    capture.take(1, qs[1], heads, dim, 0.5)
    assert capture.complete(2) and capture.sm_scale == 0.5
    second = capture.request_queries(capture.requests[1], 2)
    for layer in range(2):
        assert torch.equal(second[layer], qs[layer][[8, 9]].reshape(2, heads, dim))
    first = capture.request_queries(capture.requests[0], 2)
    assert torch.equal(first[1], qs[1][[3]].reshape(1, heads, dim))
