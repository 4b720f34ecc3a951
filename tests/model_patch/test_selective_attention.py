"""Selective attention: run layout (contiguous runs, keys [0, run end]), backend choice, Triton path."""

import pytest
import torch

from vlcache_sglang.kernels.scattered_attention import ScatteredAttention, build_tiles
from vlcache_sglang.kernels.scattered_attention_reference import scattered_attention_reference
from vlcache_sglang.model_patch.selective_attention import (
    SelectiveAttention,
    choose_backend,
    kv_indices_for,
    kv_rows_streamed,
    query_tokens,
    runs_of,
)


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


# ---- backend choice and the Triton path -------------------------------------------------------

BF16 = torch.bfloat16


def test_query_tokens_expand_runs_in_q_order():
    runs = runs_of([torch.tensor([3, 4, 5, 9, 20]), torch.tensor([0, 1])], req_rows=[7, 2])
    rows, positions = query_tokens(runs)
    assert rows.tolist() == [7, 7, 7, 7, 7, 2, 2]
    assert positions.tolist() == [3, 4, 5, 9, 20, 0, 1]


def test_kv_rows_streamed_counts_one_prefix_per_tile():
    # One request, queries 10, 11 | 30 | 31 as runs [10, 11] and [30, 31] with tiles of 2 queries.
    runs = runs_of([torch.tensor([10, 11, 30, 31])], req_rows=[0])
    assert kv_rows_streamed(runs, block_m=2) == (12 + 32, 12 + 32), "tiles inside runs: the same walks"
    assert kv_rows_streamed(runs, block_m=4) == (12 + 32, 32), "one tile over the request walks once"
    scattered = runs_of([torch.arange(100, 3000, 100)], req_rows=[0])  # 29 one-token runs
    per_run, per_request = kv_rows_streamed(scattered, block_m=9)
    assert per_run == int(torch.arange(101, 3001, 100).sum()) and per_request < per_run / 5


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block_m", [1, 4, 9])
def test_per_run_count_equals_tiles_cut_at_runs(seed, block_m):
    """The closed form for FlashInfer's side is the tile walk with a tile boundary at every run."""
    gen = torch.Generator().manual_seed(seed)
    active = [torch.randperm(300, generator=gen)[: int(torch.randint(1, 120, (1,), generator=gen))].sort().values
              for _ in range(3)]
    runs = runs_of(active, req_rows=[4, 0, 2])
    _, positions = query_tokens(runs)
    run_ids = torch.repeat_interleave(torch.arange(runs.run_len.numel()), runs.run_len)
    tiles = build_tiles(run_ids, positions, block_m)
    assert kv_rows_streamed(runs, block_m)[0] == int((tiles[:, 4].long() + 1).sum())


def test_choice_follows_the_run_structure():
    contiguous = runs_of([torch.arange(2900, 3000)], req_rows=[0])
    few_long = runs_of([torch.cat([torch.arange(100, 150), torch.arange(2900, 3000)])], req_rows=[0])
    scattered = runs_of([torch.arange(0, 3000, 20)], req_rows=[0])  # 150 one-token runs, 5 %
    assert choose_backend(contiguous, 28, 4, BF16, BF16) == "flashinfer"
    assert choose_backend(few_long, 28, 4, BF16, BF16) == "flashinfer"
    assert choose_backend(scattered, 28, 4, BF16, BF16) == "triton"
    assert choose_backend(runs_of([], []), 28, 4, BF16, BF16) == "triton", "empty: nothing to launch"


def test_threshold_is_the_switch(monkeypatch):
    import vlcache_sglang.model_patch.selective_attention as sa

    runs = runs_of([torch.arange(0, 3000, 20)], req_rows=[0])
    per_run, per_request = kv_rows_streamed(runs, ScatteredAttention.block_m(28, 4))
    monkeypatch.setattr(sa, "TRITON_MIN_KV_RATIO", per_run / per_request)
    assert choose_backend(runs, 28, 4, BF16, BF16) == "triton"
    monkeypatch.setattr(sa, "TRITON_MIN_KV_RATIO", per_run / per_request * 1.01)
    assert choose_backend(runs, 28, 4, BF16, BF16) == "flashinfer"


def _pool(device, slots=128, kv_heads=2, head_dim=64, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(slots, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(slots, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    req_to_token = torch.randperm(slots, generator=gen)[:120].reshape(3, 40).to(device=device, dtype=torch.int32)
    return k, v, req_to_token


def test_selective_attention_runs_the_triton_kernel(device):
    k, v, req_to_token = _pool(device)
    active = [torch.tensor([0, 5, 9, 17, 33, 39]), torch.tensor([2, 4, 6, 8])]
    runs = runs_of(active, req_rows=[2, 0])
    attn = SelectiveAttention(torch.device(device))
    attn.plan(runs, req_to_token, 4, 2, 64, 0.125, torch.float32, torch.float32, backend="triton")
    assert attn.backend == "triton"
    q = torch.randn(10, 4, 64, generator=torch.Generator().manual_seed(1)).to(device)
    rows, positions = query_tokens(runs)
    want = scattered_attention_reference(q, k, v, req_to_token, rows, positions, 0.125)
    torch.testing.assert_close(attn.run(q, k, v), want, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="planned for 10"):
        attn.run(q[:3], k, v)


def test_fp8_kv_goes_to_flashinfer_and_unknown_backends_are_refused(device):
    scattered = runs_of([torch.arange(0, 3000, 20)], req_rows=[0])
    assert choose_backend(scattered, 28, 4, BF16, torch.float8_e4m3fn) == "flashinfer", "Triton reads q's dtype only"
    _, _, req_to_token = _pool(device)
    with pytest.raises(ValueError, match="backend must be one of"):
        SelectiveAttention(torch.device(device)).plan(scattered, req_to_token, 4, 2, 64, 0.125, BF16, BF16,
                                                      backend="fa3")


def test_empty_token_set_runs_nothing(device):
    _, _, req_to_token = _pool(device)
    attn = SelectiveAttention(torch.device(device))
    attn.plan(runs_of([], []), req_to_token, 4, 2, 64, 0.125, torch.float32, torch.float32)
    k, v, _ = _pool(device)
    assert attn.run(torch.empty(0, 4, 64, device=device), k, v).shape == (0, 4, 64)
