"""Scattered-query attention kernel: equal to its torch reference, and to FlashInfer's runs on the GPU."""

from __future__ import annotations

import math

import pytest
import torch

from vlcache_sglang.kernels.scattered_attention import ScatteredAttention, build_tiles
from vlcache_sglang.kernels.scattered_attention_reference import scattered_attention_reference

TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3, torch.float32: 1e-5}

# (req_to_token row, request length, active positions): scattered with position 0, a contiguous
# stretch crossing several 16-key blocks and query tiles, a single token, a request of one token.
CASE = [
    (3, 40, [0, 7, 8, 19, 33, 39]),
    (0, 37, list(range(10, 31))),
    (1, 5, [4]),
    (2, 1, [0]),
]


def _pool(case, kv_heads, head_dim, dtype, device, seed=0, width=48, slots=256):
    """Random K/V pool and a req_to_token whose rows map positions to scattered slots."""
    gen = torch.Generator().manual_seed(seed)
    k = torch.randn(slots, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(slots, kv_heads, head_dim, generator=gen).to(device=device, dtype=dtype)
    num_rows = 1 + max(row for row, _, _ in case)
    req_to_token = torch.randperm(slots, generator=gen)[: num_rows * width].reshape(num_rows, width)
    rows = torch.cat([torch.full((len(pos),), row) for row, _, pos in case])
    positions = torch.cat([torch.tensor(pos) for _, _, pos in case])
    return k, v, req_to_token.to(device=device, dtype=torch.int32), rows, positions


def _q(n, heads, head_dim, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, heads, head_dim, generator=gen).to(device=device, dtype=dtype)


def _attend(q, k, v, req_to_token, rows, positions, kv_heads, num_splits=None, **blocks):
    attn = ScatteredAttention(num_splits=num_splits)
    attn.plan(rows, positions, req_to_token, q.shape[1], kv_heads, q.shape[2], 1 / math.sqrt(q.shape[2]), **blocks)
    return attn.run(q, k, v)


# Split-KV with 16-key blocks: 3 splits of a 40-key request are [0, 16), [16, 32), [32, 40); the
# 5-key request's later splits are empty; queries at 0, 7, 8 see no key of split 2 (-inf partials).
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("qo_heads, kv_heads, head_dim", [(6, 2, 64), (4, 4, 128), (7, 1, 64)])
def test_kernel_matches_reference(dtype, qo_heads, kv_heads, head_dim, num_splits, device):
    k, v, req_to_token, rows, positions = _pool(CASE, kv_heads, head_dim, dtype, device)
    q = _q(rows.numel(), qo_heads, head_dim, dtype, device)
    # Small blocks: tiles that hold several requests' worth of splits and cross 16-key blocks.
    got = _attend(q, k, v, req_to_token, rows, positions, kv_heads, num_splits, block_rows=16, block_n=16)
    want = scattered_attention_reference(q, k, v, req_to_token, rows, positions, 1 / math.sqrt(head_dim))
    torch.testing.assert_close(got.float(), want.float(), rtol=TOL[dtype], atol=TOL[dtype])
    # The one-token request sees key 0 only: its output is V of that slot, for every head.
    slot0 = int(req_to_token[2, 0])
    group = qo_heads // kv_heads
    torch.testing.assert_close(got[-1].float(), v[slot0].repeat_interleave(group, 0).float(), rtol=1e-2, atol=1e-2)


def test_default_blocks_and_strided_q(device):
    """The defaults (64 rows, 64 keys) and a q that is a view into a fused qkv tensor."""
    k, v, req_to_token, rows, positions = _pool(CASE, 4, 128, torch.bfloat16, device, seed=5)
    n, qo_heads = rows.numel(), 28
    qkv = _q(n, qo_heads + 8, 128, torch.bfloat16, device).reshape(n, -1)
    q = qkv[:, : qo_heads * 128].view(n, qo_heads, 128)
    assert not q.is_contiguous()
    got = _attend(q, k, v, req_to_token, rows, positions, 4)
    want = scattered_attention_reference(q, k, v, req_to_token, rows, positions, 1 / math.sqrt(128))
    torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("num_splits", [1, 4])
def test_keys_past_each_request_are_never_read(num_splits, device):
    """NaN in every slot outside the requests' visible keys changes nothing."""
    k, v, req_to_token, rows, positions = _pool(CASE, 2, 64, torch.float32, device, seed=2)
    q = _q(rows.numel(), 4, 64, torch.float32, device)
    clean = _attend(q, k, v, req_to_token, rows, positions, 2, num_splits, block_rows=16, block_n=16)
    visible = torch.cat([req_to_token[row, : max(pos) + 1].long() for row, _, pos in CASE])
    poison = torch.ones(k.shape[0], dtype=torch.bool, device=device)
    poison[visible] = False
    k[poison], v[poison] = float("nan"), float("nan")
    got = _attend(q, k, v, req_to_token, rows, positions, 2, num_splits, block_rows=16, block_n=16)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, clean, rtol=0, atol=0)


def test_out_argument_is_filled(device):
    k, v, req_to_token, rows, positions = _pool(CASE, 2, 64, torch.float16, device, seed=3)
    q = _q(rows.numel(), 2, 64, torch.float16, device)
    attn = ScatteredAttention()
    attn.plan(rows, positions, req_to_token, 2, 2, 64, 0.125, block_rows=16, block_n=16)
    out = torch.full_like(q, float("nan"))
    assert attn.run(q, k, v, out=out) is out
    want = scattered_attention_reference(q, k, v, req_to_token, rows, positions, 0.125)
    torch.testing.assert_close(out.float(), want.float(), rtol=2e-3, atol=2e-3)


def test_empty_token_set(device):
    k, v, req_to_token, _, _ = _pool(CASE, 2, 64, torch.bfloat16, device)
    empty = torch.empty(0, dtype=torch.int64)
    attn = ScatteredAttention()
    attn.plan(empty, empty, req_to_token, 4, 2, 64, 0.125)
    assert attn.num_tiles == 0
    out = attn.run(torch.empty(0, 4, 64, dtype=torch.bfloat16, device=device), k, v)
    assert out.shape == (0, 4, 64)


def test_tiles_split_at_requests_and_every_block_m():
    rows = torch.tensor([5, 5, 5, 5, 5, 2, 2, 9])
    positions = torch.tensor([3, 8, 9, 40, 41, 0, 7, 12])
    tiles = build_tiles(rows, positions, block_m=2)
    # (q_start, q_len, req_row, min_pos, max_pos), longest KV walk first
    assert tiles.tolist() == [[4, 1, 5, 41, 41], [2, 2, 5, 9, 40], [7, 1, 9, 12, 12], [0, 2, 5, 3, 8],
                              [5, 2, 2, 0, 7]]
    assert tiles.dtype == torch.int32
    assert build_tiles(torch.empty(0), torch.empty(0), 4).shape == (0, 5)


@pytest.mark.parametrize(
    "plan_args, match",
    [
        (dict(positions=torch.tensor([0, 48])), r"positions must lie in \[0, 48\)"),
        (dict(positions=torch.tensor([0, -1])), "positions must lie"),
        (dict(qo_heads=5), "multiple of num_kv_heads"),
        (dict(block_rows=48), "power of two"),
        (dict(block_n=8), "power of two"),
        (dict(rows=torch.tensor([0])), "one length"),
    ],
)
def test_bad_plans_are_clear_errors(plan_args, match, device):
    _, _, req_to_token, _, _ = _pool(CASE, 2, 64, torch.float16, device)
    args = dict(rows=torch.tensor([0, 0]), positions=torch.tensor([0, 1]), qo_heads=4, block_rows=16, block_n=16)
    args.update(plan_args)
    with pytest.raises(ValueError, match=match):
        ScatteredAttention().plan(args["rows"], args["positions"], req_to_token, args["qo_heads"], 2, 64, 0.1,
                                  block_rows=args["block_rows"], block_n=args["block_n"])


def test_bad_runs_are_clear_errors(device):
    k, v, req_to_token, rows, positions = _pool(CASE, 2, 64, torch.float16, device)
    attn = ScatteredAttention()
    with pytest.raises(RuntimeError, match="before plan"):
        attn.run(_q(1, 4, 64, torch.float16, device), k, v)
    attn.plan(rows, positions, req_to_token, 4, 2, 64, 0.125)
    q = _q(rows.numel(), 4, 64, torch.float16, device)
    with pytest.raises(ValueError, match="as planned"):
        attn.run(q[:-1], k, v)
    with pytest.raises(ValueError, match=r"k_cache must be \[slots, 2, 64\]"):
        attn.run(q, k[:, :1], v)
    with pytest.raises(NotImplementedError, match="FlashInfer"):
        attn.run(q, k.to(torch.bfloat16), v)


# ---- GPU: realistic 7B shapes --------------------------------------------------------------------

def _scattered_positions(gen, prefix, image, suffix, ratio):
    """A request of [text prefix][image][text suffix]: some image tokens picked anywhere, suffix all."""
    picked = prefix + torch.randperm(image, generator=gen)[: max(1, int(ratio * image))].sort().values
    return torch.cat([picked, torch.arange(prefix + image, prefix + image + suffix)])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_7b_shapes_match_reference_and_flashinfer_runs():
    from vlcache_sglang.model_patch.selective_attention import SelectiveAttention, runs_of

    qo_heads, kv_heads, head_dim, dtype = 28, 4, 128, torch.bfloat16
    gen = torch.Generator().manual_seed(0)
    layouts = [(14, 2916, 70, 0.05), (30, 2500, 400, 0.03), (5, 3000, 20, 0.2)]
    slots, width = 16384, 4096
    k = torch.randn(slots, kv_heads, head_dim, generator=gen).to("cuda", dtype)
    v = torch.randn(slots, kv_heads, head_dim, generator=gen).to("cuda", dtype)
    req_rows = [7, 2, 11]
    req_to_token = torch.zeros(16, width, dtype=torch.int32)
    perm = torch.randperm(slots, generator=gen)
    for i, row in enumerate(req_rows):
        req_to_token[row] = perm[i * width : (i + 1) * width]
    req_to_token = req_to_token.cuda()
    active = [_scattered_positions(gen, *layout) for layout in layouts]
    runs = runs_of(active, req_rows)
    rows = torch.cat([torch.full((a.numel(),), r) for a, r in zip(active, req_rows)])
    positions = torch.cat(active)
    q = torch.randn(positions.numel(), qo_heads, head_dim, generator=gen).to("cuda", dtype)
    scale = 1 / math.sqrt(head_dim)

    want = scattered_attention_reference(q, k, v, req_to_token, rows, positions, scale).float()
    outs = {}
    for backend in ("triton", "flashinfer"):
        attn = SelectiveAttention(torch.device("cuda"))
        attn.plan(runs, req_to_token, qo_heads, kv_heads, head_dim, scale, dtype, dtype, backend=backend)
        outs[backend] = attn.run(q, k, v).float()
        torch.testing.assert_close(outs[backend], want, rtol=2e-2, atol=2e-2, msg=lambda m: f"{backend}: {m}")
    diff = (outs["triton"] - outs["flashinfer"]).abs().max().item()
    assert diff < 2e-2, f"Triton vs FlashInfer runs differ by {diff}"
    direct = ScatteredAttention()
    direct.plan(rows, positions, req_to_token, qo_heads, kv_heads, head_dim, scale)
    assert torch.equal(direct.run(q, k, v).float(), outs["triton"]), "SelectiveAttention runs the same kernel"


@pytest.mark.parametrize("num_splits", [1, 3])
def test_fixed_capacity_replans_into_the_same_buffers_and_pads_with_zeros(num_splits, device):
    """CUDA-graph mode: plans of different sizes land in the same tile/position buffers (a graph
    captured around run() reads them), q padded to the capacity, padding rows come back zero
    (with splits too: the merge reads only rows of planned queries, not the stale partials)."""
    from vlcache_sglang.kernels.scattered_attention import CapacityError

    qo_heads, kv_heads, head_dim, dtype, cap = 4, 2, 64, torch.float32, 40
    k, v, req_to_token, rows, positions = _pool(CASE, kv_heads, head_dim, dtype, device)
    attn = ScatteredAttention(capacity=(cap, 12), num_splits=num_splits)
    scale = 1 / math.sqrt(head_dim)
    buffers = None
    for take in (rows.numel(), 6, 1):  # shrinking plans: stale tiles of the larger one must not run
        r, p = rows[:take], positions[:take]
        attn.plan(r, p, req_to_token, qo_heads, kv_heads, head_dim, scale, block_rows=16, block_n=16)
        assert attn.num_tiles == 12
        buffers = buffers or (attn._tiles.data_ptr(), attn._q_pos.data_ptr())
        assert (attn._tiles.data_ptr(), attn._q_pos.data_ptr()) == buffers
        q = _q(cap, qo_heads, head_dim, dtype, device)
        got = attn.run(q, k, v)
        want = scattered_attention_reference(q[:take], k, v, req_to_token, r, p, scale)
        torch.testing.assert_close(got[:take], want, rtol=1e-5, atol=1e-5)
        assert not got[take:].any(), "padding queries are in no tile and stay zero"
    with pytest.raises(CapacityError, match="6 tiles exceed the capacity of 40 queries, 3 tiles"):
        small = ScatteredAttention(capacity=(cap, 3))
        small.plan(rows, positions, req_to_token, qo_heads, kv_heads, head_dim, scale, block_rows=16, block_n=16)
    many = torch.arange(cap + 1) % 5
    with pytest.raises(CapacityError):
        attn.plan(many % 4, many, req_to_token, qo_heads, kv_heads, head_dim, scale)


def test_split_choice():
    from vlcache_sglang.kernels.scattered_attention import MAX_SPLITS, choose_splits

    assert choose_splits(4, 4, 50_000, torch.device("cpu")) == 1, "the interpreter gains nothing"
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        assert choose_splits(3, 4, 50_000, dev) == min(MAX_SPLITS, -(-2 * sms // 12))
        assert choose_splits(3, 4, 600, dev) == 2, "at least MIN_KEYS_PER_SPLIT keys per split"
        assert choose_splits(4 * sms, 4, 50_000, dev) == 1, "the tiles alone fill the GPU"


@pytest.mark.gpu
def test_gpu_one_compiled_variant_for_every_batch_shape():
    """Batches of 1, 16 and odd query counts with split-KV partials reuse the binaries the first batch
    compiled: a new batch shape of the eager loop compiles nothing inside a request. (Counted after the
    first call: other tests in the session compile other variants.)"""
    from vlcache_sglang.kernels import scattered_attention as mod

    def variants() -> tuple[int, int]:
        dev = torch.cuda.current_device()
        return (len(mod._scattered_attention_kernel.device_caches[dev][0]),
                len(mod._merge_splits_kernel.device_caches[dev][0]))

    k, v, req_to_token, _, _ = _pool(CASE, 4, 128, torch.bfloat16, "cuda")
    counts = []
    for n, splits in [(1, 2), (16, 3), (37, 2), (5, 4)]:
        positions, rows = torch.arange(40 - n, 40), torch.full((n,), 3)
        _attend(_q(n, 28, 128, torch.bfloat16, "cuda"), k, v, req_to_token, rows, positions, 4, num_splits=splits)
        counts.append(variants())
    assert all(c == counts[0] for c in counts), counts
