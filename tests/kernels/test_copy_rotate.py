"""Copy-and-rotate kernel: equal to its torch reference, and exact against SGLang's own M-RoPE."""

import pytest
import torch

from vlcache_sglang.kernels import copy_rotate_kv, copy_rotate_kv_reference, rotate_neox
from vlcache_sglang.model_patch.rope_params import inv_freq_of

TOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-5}


def _inv_freq(rot_dim: int, base: float = 1e6) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float32) / rot_dim))


def _pool(layers, slots, heads, d, dv, dtype, device, gen):
    k = [torch.randn(slots, heads, d, generator=gen).to(device=device, dtype=dtype) for _ in range(layers)]
    v = [torch.randn(slots, heads, dv, generator=gen).to(device=device, dtype=dtype) for _ in range(layers)]
    return k, v


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("delta", [0, 1, -1, 37, -1234, 70000])
@pytest.mark.parametrize("shape", [(3, 4, 128, 128, 128), (2, 3, 80, 64, 96), (1, 1, 16, 16, 8)])
def test_kernel_matches_reference(dtype, delta, shape, device):
    layers, heads, d, rot, dv = shape
    gen = torch.Generator().manual_seed(hash((delta, shape)) % 2**31)
    slots, n = 97, 29
    k, v = _pool(layers, slots, heads, d, dv, dtype, device, gen)
    perm = torch.randperm(slots, generator=gen)
    src, dst = perm[:n].to(device), perm[n : 2 * n].to(device)
    k_ref, v_ref = [x.clone() for x in k], [x.clone() for x in v]
    untouched = perm[2 * n :].to(device)

    copy_rotate_kv(k, v, src, dst, delta, _inv_freq(rot).to(device))
    copy_rotate_kv_reference(k_ref, v_ref, src, dst, torch.full((n,), delta, device=device), _inv_freq(rot).to(device))

    tol = TOL[dtype]
    for layer in range(layers):
        torch.testing.assert_close(k[layer].float(), k_ref[layer].float(), rtol=tol, atol=tol)
        assert torch.equal(v[layer], v_ref[layer]), "V is copied bit for bit"
        assert torch.equal(k[layer][untouched], k_ref[layer][untouched]), "other slots untouched"
    if rot < d:
        assert torch.equal(k[0][dst][..., rot:], k[0][src][..., rot:]), "non-rotary dims pass through"


def test_per_token_delta_and_in_place(device):
    gen = torch.Generator().manual_seed(7)
    k, v = _pool(2, 41, 2, 64, 64, torch.bfloat16, device, gen)
    slots = torch.tensor([3, 9, 17, 30], device=device)
    delta = torch.tensor([-5, 0, 11, 4096], device=device)
    k_ref, v_ref = [x.clone() for x in k], [x.clone() for x in v]
    copy_rotate_kv(k, v, slots, slots, delta, _inv_freq(64).to(device))  # src == dst: rotate in place
    copy_rotate_kv_reference(k_ref, v_ref, slots, slots, delta, _inv_freq(64).to(device))
    for a, b in zip(k, k_ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=8e-3, atol=8e-3)


def test_a_tensor_parallel_rank_moves_its_own_heads_as_the_whole_pool_would(device):
    """TP splits the KV heads over ranks, each with its own pool and its own copy of the plan: the
    copy-rotate on each rank's half equals that half of the copy-rotate on the whole pool."""
    gen = torch.Generator().manual_seed(11)
    k, v = _pool(2, 64, 4, 64, 64, torch.bfloat16, device, gen)
    halves = [([x[:, h].clone() for x in k], [x[:, h].clone() for x in v]) for h in (slice(0, 2), slice(2, 4))]
    src, dst = torch.tensor([1, 5, 9, 33], device=device), torch.tensor([40, 41, 42, 43], device=device)
    delta = torch.tensor([7, -3, 900, 0], device=device)
    inv_freq = _inv_freq(64).to(device)
    copy_rotate_kv(k, v, src, dst, delta, inv_freq)
    for h, (hk, hv) in zip((slice(0, 2), slice(2, 4)), halves):
        copy_rotate_kv(hk, hv, src, dst, delta, inv_freq)
        for layer in range(2):
            assert torch.equal(hk[layer], k[layer][:, h]) and torch.equal(hv[layer], v[layer][:, h])


def test_rotation_round_trip(device):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(50, 4, 128, generator=gen, dtype=torch.float32).to(device)
    delta = torch.randint(-3000, 3000, (50,), generator=gen).to(device)
    inv = _inv_freq(128).to(device)
    torch.testing.assert_close(rotate_neox(rotate_neox(x, delta, inv), -delta, inv), x, rtol=1e-4, atol=1e-4)


def test_empty_selection_is_a_no_op(device):
    gen = torch.Generator().manual_seed(1)
    k, v = _pool(2, 8, 2, 32, 32, torch.float16, device, gen)
    before = [x.clone() for x in k + v]
    empty = torch.empty(0, dtype=torch.long, device=device)
    copy_rotate_kv(k, v, empty, empty, 5, _inv_freq(32).to(device))
    assert all(torch.equal(a, b) for a, b in zip(k + v, before))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda k, v, s, d: (k, v[:1], s, d), "one K and one V"),
        (lambda k, v, s, d: ([k[0], k[1][:5]], v, s, d), "one shape"),
        (lambda k, v, s, d: (k, v, s, d[:2]), "differ in length"),
        (lambda k, v, s, d: ([x.long() for x in k], [x.long() for x in v], s, d), "not supported"),
    ],
)
def test_bad_arguments_are_clear_errors(mutate, match, device):
    gen = torch.Generator().manual_seed(2)
    k, v = _pool(2, 8, 2, 32, 32, torch.float16, device, gen)
    s = torch.tensor([0, 1, 2], device=device)
    args = mutate(k, v, s, s + 3)
    with pytest.raises(ValueError, match=match):
        copy_rotate_kv(*args, delta=1, inv_freq=_inv_freq(32).to(device))


def _image_mrope_positions(start: int, grid_h: int, grid_w: int, device) -> torch.Tensor:
    """Qwen2.5-VL M-RoPE positions of one image (t=0): (t, h, w) + start, shape [3, h*w]."""
    h = torch.arange(grid_h).repeat_interleave(grid_w)
    w = torch.arange(grid_w).repeat(grid_h)
    return (torch.stack([torch.zeros_like(h), h, w]) + start).to(device)


def _qwen_rope(server_args, dtype):
    """The rotary embedding SGLang builds for the 7B model's language layers (as qwen2.py does)."""
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang.srt.utils.hf_transformers_utils import get_rope_config

    text_config = server_args.get_model_config().hf_text_config
    rope_theta, rope_scaling = get_rope_config(text_config)
    assert rope_scaling["mrope_section"] == [16, 24, 24]
    head_dim = text_config.hidden_size // text_config.num_attention_heads
    return get_rope(head_dim, rotary_dim=head_dim, max_position=text_config.max_position_embeddings,
                    base=rope_theta, rope_scaling=rope_scaling, dtype=dtype)


@pytest.mark.parametrize("p0, delta", [(14, 0), (14, 300), (900, -850), (3, 4000)])
def test_sglang_mrope_at_p0_rotated_by_delta_equals_mrope_at_p1(sglang_server_args, p0, delta, monkeypatch):
    """The exactness fact the whole project rests on, against SGLang's own MRotaryEmbedding (fp32)."""
    import sglang.srt.layers.rotary_embedding.base as rope_base

    # Without CUDA, SGLang's RotaryEmbedding wants vLLM's kernel unless it believes it runs on its
    # CPU engine; forward_native (what we call) needs neither.
    monkeypatch.setattr(rope_base, "_is_cpu", True)
    rope = _qwen_rope(sglang_server_args, torch.float32)
    gen = torch.Generator().manual_seed(p0 + delta)
    n_heads, grid_h, grid_w = 4, 7, 9
    key = torch.randn(grid_h * grid_w, n_heads * 128, generator=gen)
    query = torch.zeros(grid_h * grid_w, 128)

    def apply(start):
        _, k = rope.forward_native(_image_mrope_positions(start, grid_h, grid_w, "cpu"), query.clone(), key.clone())
        return k.view(-1, n_heads, 128)

    inv = inv_freq_of(rope)
    moved = rotate_neox(apply(p0), torch.full((grid_h * grid_w,), delta), inv)
    fresh = apply(p0 + delta)
    # fp32 angles of positions ~4000 carry ~5e-4 absolute error, in stock M-RoPE as in ours.
    torch.testing.assert_close(moved, fresh, rtol=1e-3, atol=2e-3)
    assert (moved - fresh).norm() / fresh.norm() < 1e-4
    if delta:
        assert not torch.allclose(apply(p0), apply(p0 + delta), atol=1e-2), "the test can fail"


@pytest.mark.gpu
def test_kernel_on_sglang_mrope_cuda_bf16(sglang_server_args):
    """GPU: SGLang's CUDA M-RoPE at p0, moved by the kernel inside a 7B-shaped pool, vs M-RoPE at p1."""
    rope = _qwen_rope(sglang_server_args, torch.bfloat16).cuda()
    layers, heads, slots, grid_h, grid_w = 28, 4, 8192, 36, 54  # a 1080p image: 1944 tokens
    n = grid_h * grid_w
    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(n, heads * 128, generator=gen).to("cuda", torch.bfloat16)
    q = torch.zeros(n, 28 * 128, device="cuda", dtype=torch.bfloat16)
    p0, p1 = 21, 1490

    def apply(start):
        _, k = rope.forward(_image_mrope_positions(start, grid_h, grid_w, "cuda"), q.clone(), raw.clone())
        return k.view(n, heads, 128)

    k_pool = [torch.zeros(slots, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    v_pool = [torch.randn(slots, heads, 128, device="cuda", dtype=torch.bfloat16) for _ in range(layers)]
    src = torch.arange(100, 100 + n, device="cuda")
    dst = torch.arange(4000, 4000 + n, device="cuda")
    for kb in k_pool:
        kb[src] = apply(p0)
    copy_rotate_kv(k_pool, v_pool, src, dst, p1 - p0, inv_freq_of(rope).cuda())
    want = apply(p1).float()
    for layer in (0, layers // 2, layers - 1):
        got = k_pool[layer][dst].float()
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert torch.equal(v_pool[layer][dst], v_pool[layer][src])
        rel = (got - want).norm() / want.norm()
        assert rel < 1e-2, f"relative error {rel:.2e}"
