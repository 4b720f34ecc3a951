"""Run layout of the selective attention: contiguous runs, and each run's keys [0, run end]."""

import torch

from vlcache_sglang.model_patch.selective_attention import kv_indices_for, runs_of


def test_runs_split_where_indices_jump():
    runs = runs_of([torch.tensor([3, 4, 5, 9, 10, 20]), torch.tensor([0, 1, 2])], req_rows=[7, 2])
    assert runs.req_rows.tolist() == [7, 7, 7, 2]
    assert runs.run_start.tolist() == [3, 9, 20, 0]
    assert runs.run_len.tolist() == [3, 2, 1, 3]
    assert runs.kv_len.tolist() == [6, 11, 21, 3], "a run attends every key up to its last token"


def test_empty_requests_have_no_runs():
    runs = runs_of([torch.empty(0, dtype=torch.long), torch.tensor([4])], req_rows=[0, 1])
    assert runs.req_rows.tolist() == [1] and runs.kv_len.tolist() == [5]
    assert runs_of([], []).run_len.numel() == 0


def test_kv_indices_are_each_runs_slot_prefix():
    req_to_token = torch.arange(4 * 32, dtype=torch.int32).reshape(4, 32) + 1000
    runs = runs_of([torch.tensor([2, 3, 7]), torch.tensor([0])], req_rows=[3, 1])
    got = kv_indices_for(runs, req_to_token)
    want = torch.cat([req_to_token[3, :4], req_to_token[3, :8], req_to_token[1, :1]])
    assert torch.equal(got, want) and got.dtype == torch.int32
