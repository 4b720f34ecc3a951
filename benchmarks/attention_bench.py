"""Selective attention on the GPU: FlashInfer's paged prefill over runs vs the Triton scattered kernel.

    source benchmarks/gpu_env.sh && python3 benchmarks/attention_bench.py
    python3 benchmarks/attention_bench.py --req-len 40000 --runs 16,256,1024,2000 --batch 1  # 4 4K images

For each request length, batch size and run count, every request has --active of its tokens
active, split into that many evenly spaced runs of equal length. Each backend attends the active
queries over their requests' whole KV with Qwen2.5-VL-7B head shapes, cycling through one pool
buffer per layer as a forward does (not the L2-warm KV of the previous call). Columns:
`kv ratio`, what `choose_backend` compares with TRITON_MIN_KV_RATIO; microseconds per layer for
FlashInfer and for the Triton kernel per tile size (query rows x keys), host launch cost included
as in the patched forward (prefill runs without CUDA graphs); `faster`, the default Triton tile vs
FlashInfer; `chosen`, what the current threshold picks; the plan cost of FlashInfer and of the
chosen backend (paid once per distinct token set); max |FlashInfer - Triton| over the outputs;
with --fa3, FlashInfer's Hopper backend's us per layer and its max |fa3 - fa2|.
Set the threshold between the largest `kv ratio` where FlashInfer wins and the smallest where
Triton does, and the default tile to the fastest column.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from vlcache_sglang.kernels.scattered_attention import DEFAULT_BLOCK_N, DEFAULT_BLOCK_ROWS, ScatteredAttention
from vlcache_sglang.model_patch import selective_attention as sa
from vlcache_sglang.model_patch.selective_attention import SelectiveAttention, kv_rows_streamed, query_tokens, runs_of


def even_runs(req_len: int, n_active: int, n_runs: int) -> torch.Tensor:
    """Sorted positions of n_active tokens in n_runs equal runs, one centred in each 1/n_runs of the request."""
    lens = torch.full((n_runs,), n_active // n_runs) + (torch.arange(n_runs) < n_active % n_runs)
    stride = req_len // n_runs
    if int(lens.max()) >= stride:
        raise ValueError(f"{n_active} tokens in {n_runs} runs over {req_len} tokens would leave no gaps")
    starts = torch.arange(n_runs) * stride + (stride - lens) // 2
    return torch.cat([torch.arange(int(s), int(s + n)) for s, n in zip(starts, lens)])


class Pool:
    """Per-layer K/V buffers and a req_to_token whose rows scatter positions over the slots."""

    def __init__(self, batch: int, req_len: int, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype):
        gen = torch.Generator(device="cuda").manual_seed(0)
        slots = batch * req_len + 1024
        self.k = [torch.randn(slots, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen) for _ in range(layers)]
        self.v = [torch.randn(slots, kv_heads, head_dim, device="cuda", dtype=dtype, generator=gen) for _ in range(layers)]
        perm = torch.randperm(slots, device="cuda", generator=gen)[: batch * req_len]
        self.req_to_token = torch.zeros(batch + 3, req_len, dtype=torch.int32, device="cuda")
        self.rows = [i + 1 for i in range(batch)]  # row 0 left unused, as SGLang's padding row
        self.req_to_token[1 : batch + 1] = perm.view(batch, req_len).to(torch.int32)


def time_per_layer(fn, layers: int, iters: int) -> float:
    """Microseconds per call of fn(layer), cycling through the layers."""
    for layer in range(layers):
        fn(layer)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(iters):
        fn(i % layers)
    end.record()
    torch.cuda.synchronize()
    return 1000 * start.elapsed_time(end) / iters


def plan_us(plan, reps: int = 10) -> float:
    """Wall-clock microseconds of one plan (host work, copies and FlashInfer's sync included)."""
    plan()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        plan()
    torch.cuda.synchronize()
    return 1e6 * (time.perf_counter() - t0) / reps


def bench_case(pool: Pool, active: list[torch.Tensor], args: argparse.Namespace, dtype: torch.dtype) -> dict:
    runs = runs_of(active, pool.rows)
    rows, positions = query_tokens(runs)
    n = positions.numel()
    scale = 1 / math.sqrt(args.head_dim)
    q = torch.randn(n, args.heads, args.head_dim, device="cuda", dtype=dtype)
    layers = len(pool.k)

    flashinfer = SelectiveAttention(torch.device("cuda"))
    result = {"plan_flashinfer": plan_us(lambda: flashinfer.plan(
        runs, pool.req_to_token, args.heads, args.kv_heads, args.head_dim, scale, dtype, dtype, backend="flashinfer"))}
    result["flashinfer"] = time_per_layer(lambda l: flashinfer.run(q, pool.k[l], pool.v[l]), layers, args.iters)
    if args.fa3:
        result["fa3"], result["fa3_diff"] = fa3_case(flashinfer, runs, pool, q, args, scale, dtype)
    auto = SelectiveAttention(torch.device("cuda"))  # what the forward pays: choice plus the chosen plan
    result["plan_auto"] = plan_us(lambda: auto.plan(runs, pool.req_to_token, args.heads, args.kv_heads,
                                                    args.head_dim, scale, dtype, dtype))
    for block_rows, block_n in args.blocks:
        triton_attn = ScatteredAttention()
        triton_attn.plan(rows, positions, pool.req_to_token, args.heads, args.kv_heads, args.head_dim, scale,
                         block_rows=block_rows, block_n=block_n)
        result[(block_rows, block_n)] = time_per_layer(lambda l: triton_attn.run(q, pool.k[l], pool.v[l]),
                                                       layers, args.iters)
        if (block_rows, block_n) == (DEFAULT_BLOCK_ROWS, DEFAULT_BLOCK_N):
            diff = (triton_attn.run(q, pool.k[0], pool.v[0]).float() - flashinfer.run(q, pool.k[0], pool.v[0]).float())
            result["max_diff"] = diff.abs().max().item()
    per_run, per_request = kv_rows_streamed(runs, ScatteredAttention.block_m(args.heads, args.kv_heads))
    result.update(n=n, runs=runs.run_len.numel(), mean_len=n / runs.run_len.numel(), ratio=per_run / per_request,
                  choice=sa.choose_backend(runs, args.heads, args.kv_heads, dtype, dtype))
    return result


def fa3_case(fa2: SelectiveAttention, runs, pool: Pool, q: torch.Tensor, args: argparse.Namespace, scale: float,
             dtype: torch.dtype) -> tuple[str, str]:
    """FlashInfer's Hopper backend on the same runs: (us per layer, max |fa3 - fa2|), or why it cannot run."""
    fa3 = SelectiveAttention(torch.device("cuda"), flashinfer_backend="fa3")
    try:
        fa3.plan(runs, pool.req_to_token, args.heads, args.kv_heads, args.head_dim, scale, dtype, dtype,
                 backend="flashinfer")
        us = time_per_layer(lambda l: fa3.run(q, pool.k[l], pool.v[l]), len(pool.k), args.iters)
    except Exception as exc:  # an unsupported configuration is a result here, not a crash of the table
        return f"n/a ({type(exc).__name__})", "–"
    diff = (fa3.run(q, pool.k[0], pool.v[0]).float() - fa2.run(q, pool.k[0], pool.v[0]).float()).abs().max()
    return f"{us:.1f}", f"{diff.item():.2e}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--req-len", default="3000", help="request lengths, e.g. 3000,40000 (4 4K images)")
    p.add_argument("--active", type=float, default=0.05, help="share of each request's tokens that is active")
    p.add_argument("--runs", default="1,4,16,64,150", help="runs per request (capped at the active tokens)")
    p.add_argument("--batch", default="1,4", help="requests per batch")
    p.add_argument("--block-rows", default="32,64,128", help="Triton query-row tile sizes to compare")
    p.add_argument("--block-n", default="32,64", help="Triton key tile sizes to compare")
    p.add_argument("--heads", type=int, default=28)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--iters", type=int, default=280)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--fa3", action="store_true",
                   help="add FlashInfer's fa3 backend (Hopper) beside fa2: us per layer and max |fa3 - fa2|")
    args = p.parse_args()
    args.blocks = sorted({(int(r), int(n)) for r in args.block_rows.split(",") for n in args.block_n.split(",")}
                         | {(DEFAULT_BLOCK_ROWS, DEFAULT_BLOCK_N)})
    dtype = getattr(torch, args.dtype)
    print(f"{torch.cuda.get_device_name()}, {args.heads} q / {args.kv_heads} kv heads, head_dim {args.head_dim}, "
          f"{args.dtype}, {args.active:.0%} of each request active; us per layer (mean of {args.iters} calls over "
          f"{args.layers} layer buffers); TRITON_MIN_KV_RATIO = {sa.TRITON_MIN_KV_RATIO}")
    fa3_head = " fa3 us | max abs fa3 - fa2 |" if args.fa3 else ""
    print("| req len | batch | runs/req | mean run len | kv ratio | flashinfer us |" + fa3_head + " "
          + " | ".join(f"triton {r}x{n} us" for r, n in args.blocks) + " | faster | chosen | plan us (flashinfer, chosen) | max abs diff |")
    print("|---" * (10 + len(args.blocks) + 2 * args.fa3) + "|")
    for req_len in (int(x) for x in args.req_len.split(",")):
        n_active = max(1, round(args.active * req_len))
        for batch in (int(x) for x in args.batch.split(",")):
            pool = Pool(batch, req_len, args.layers, args.kv_heads, args.head_dim, dtype)
            for n_runs in sorted({min(int(x), n_active) for x in args.runs.split(",")}):
                r = bench_case(pool, [even_runs(req_len, n_active, n_runs)] * batch, args, dtype)
                faster = "triton" if r[(DEFAULT_BLOCK_ROWS, DEFAULT_BLOCK_N)] < r["flashinfer"] else "flashinfer"
                print(f"| {req_len} | {batch} | {n_runs} | {r['mean_len']:.1f} | {r['ratio']:.2f} | "
                      f"{r['flashinfer']:.1f} | " + (f"{r['fa3']} | {r['fa3_diff']} | " if args.fa3 else "")
                      + " | ".join(f"{r[b]:.1f}" for b in args.blocks)
                      + f" | {faster} | {r['choice']} | {r['plan_flashinfer']:.0f}, {r['plan_auto']:.0f} | "
                      f"{r['max_diff']:.2e} |", flush=True)
            del pool
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
