"""Attention for a subset of a batch's extend tokens over each request's whole KV.

An active token at request position p attends keys [0, p] of its request (cached prefix, reused
image KV, fresh tokens alike). Two backends, picked per token set by `choose_backend`:

* FlashInfer: the active tokens of a request are split into maximal contiguous runs. A run covering
  request tokens [a, b] attends keys [0, b] under the ordinary bottom-right causal mask: its query i
  sees keys <= a + i, i.e. pos(key) <= pos(query). Each run is one "request" of FlashInfer's paged
  prefill with page size 1. Best for few long runs; every run streams its whole KV prefix again.
* Triton (`kernels/scattered_attention.py`): tiles of up to BLOCK_M active tokens of one request,
  however scattered, stream the request's KV once per tile with a per-query causal mask. Best when a
  policy scatters its picks into many short runs.

Either way the plan is built once per distinct token set (plan) and every layer that uses that set
only runs it (run).
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from vlcache_sglang.kernels.scattered_attention import ScatteredAttention, build_tiles

_WORKSPACE_BYTES = 256 * 1024 * 1024
BACKENDS = ("flashinfer", "triton")
# Pick Triton when FlashInfer's runs would stream at least this many times the KV rows that the
# Triton tiles stream (`kv_rows_streamed`). The model: both kernels are bound by those gathered
# reads, and FlashInfer's tuned FA2 pipeline reads a row faster than our Triton loop, so Triton
# must save a margin to win.
# Set from benchmarks/attention_bench.py on an H200 (2026-11-21, 7B heads, bf16, 5% active, tile
# 128x64): one 3,000-token request, FlashInfer wins up to ratio 3.9 (58 vs 90 us) and ties at 8.2
# (89 vs 91); one 40,000-token request, FlashInfer wins at 1.2 (2.9 vs 3.5 ms), Triton at 4.7
# (3.5 vs 5.7 ms). Four 3,000-token requests, Triton already wins at ratio 1.0-3.9 (89 vs 148 us):
# the ratio alone misses that, so 4.0 is the conservative side (never slower than 1.6x).
TRITON_MIN_KV_RATIO = 4.0


@dataclasses.dataclass(frozen=True)
class RunLayout:
    """Contiguous runs of active tokens, host side.

    req_rows:  [R] req_to_token row of each run's request
    run_start: [R] absolute token index where each run starts (within its request)
    run_len:   [R] tokens in each run
    """

    req_rows: torch.Tensor
    run_start: torch.Tensor
    run_len: torch.Tensor

    @property
    def kv_len(self) -> torch.Tensor:
        return self.run_start + self.run_len  # keys [0, run end]


def runs_of(active_abs: list[torch.Tensor], req_rows: list[int]) -> RunLayout:
    """Runs of each request's sorted active absolute token indices (CPU)."""
    rows, starts, lens = [], [], []
    for row, toks in zip(req_rows, active_abs):
        if toks.numel() == 0:
            continue
        breaks = torch.nonzero(toks[1:] != toks[:-1] + 1).flatten() + 1
        bounds = torch.cat([torch.tensor([0]), breaks, torch.tensor([toks.numel()])])
        starts.append(toks[bounds[:-1]])
        lens.append(bounds[1:] - bounds[:-1])
        rows.append(torch.full((bounds.numel() - 1,), row, dtype=torch.int64))
    if not rows:
        empty = torch.empty(0, dtype=torch.int64)
        return RunLayout(empty, empty, empty)
    return RunLayout(torch.cat(rows), torch.cat(starts), torch.cat(lens))


def kv_indices_for(runs: RunLayout, req_to_token: torch.Tensor) -> torch.Tensor:
    """[sum(kv_len)] slot ids: req_to_token[row, 0:kv_len] for each run, concatenated (device)."""
    device = req_to_token.device
    total = int(runs.kv_len.sum())  # on the host: repeat_interleave without output_size syncs the device
    kv_len = runs.kv_len.to(device)
    rows = torch.repeat_interleave(runs.req_rows.to(device), kv_len, output_size=total)
    starts = torch.cumsum(kv_len, 0) - kv_len
    cols = torch.arange(total, device=device) - torch.repeat_interleave(starts, kv_len, output_size=total)
    return req_to_token[rows, cols].to(torch.int32)


def query_tokens(runs: RunLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """[n] request row and [n] position of every active token, in run order (q's row order)."""
    n = int(runs.run_len.sum())
    rows = torch.repeat_interleave(runs.req_rows, runs.run_len)
    run_first = torch.cumsum(runs.run_len, 0) - runs.run_len  # index of each run's first token
    return rows, torch.repeat_interleave(runs.run_start - run_first, runs.run_len) + torch.arange(n)


def kv_rows_streamed(runs: RunLayout, block_m: int) -> tuple[int, int]:
    """KV rows (per KV head) streamed by tiles of block_m queries cut (per run, per request).

    Both kernels walk a tile's causal prefix once per tile of queries. FlashInfer's tiles stop at
    run boundaries, so each short run re-reads its prefix; the Triton tiles span a whole request.
    The first count is always >= the second; equal when every request is one run.
    """
    # Per run, in closed form: full tile k of a run starting at s walks s + (k + 1) * block_m
    # keys; a partial last tile walks to the run's end.
    full, rest = runs.run_len // block_m, runs.run_len % block_m
    per_run = full * runs.run_start + block_m * full * (full + 1) // 2 + (rest > 0) * runs.kv_len
    tiles = build_tiles(*query_tokens(runs), block_m)
    return int(per_run.sum()), int((tiles[:, 4].to(torch.int64) + 1).sum())


def choose_backend(runs: RunLayout, num_qo_heads: int, num_kv_heads: int, q_dtype: torch.dtype,
                   kv_dtype: torch.dtype) -> str:
    """"triton" when short runs would make FlashInfer re-read the KV prefix too often, else "flashinfer"."""
    if not ScatteredAttention.supports(q_dtype, kv_dtype):
        return "flashinfer"
    if runs.run_len.numel() == 0:
        return "triton"  # nothing to launch (FlashInfer's plan wants at least one request)
    per_run, per_request = kv_rows_streamed(runs, ScatteredAttention.block_m(num_qo_heads, num_kv_heads))
    return "triton" if per_run >= TRITON_MIN_KV_RATIO * per_request else "flashinfer"


class SelectiveAttention:
    """plan(): once per token set; run(): per layer. FlashInfer's paged prefill or the Triton kernel."""

    def __init__(self, device: torch.device, flashinfer_backend: str = "fa2") -> None:
        """flashinfer_backend: FlashInfer's paged-prefill implementation; "fa2" as SGLang's own
        paged prefill uses (`attention_bench.py --fa3` compares FlashInfer's Hopper "fa3")."""
        self._device = device
        self._flashinfer_backend = flashinfer_backend
        self._wrapper = None  # FlashInfer's, made on first use: it needs a GPU, Triton-only plans do not
        self._triton = ScatteredAttention()
        self._planned_q: Optional[int] = None
        self.backend: Optional[str] = None  # the planned one

    def _flashinfer(self):
        if self._wrapper is None:
            import flashinfer

            workspace = torch.empty(_WORKSPACE_BYTES, dtype=torch.uint8, device=self._device)
            self._wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD",
                                                                           backend=self._flashinfer_backend)
        return self._wrapper

    def plan(
        self,
        runs: RunLayout,
        req_to_token: torch.Tensor,
        num_qo_heads: int,
        num_kv_heads: int,
        head_dim: int,
        sm_scale: float,
        q_dtype: torch.dtype,
        kv_dtype: torch.dtype,
        backend: Optional[str] = None,
    ) -> None:
        """backend: None picks by `choose_backend`; "flashinfer" or "triton" forces one (tests, benchmarks)."""
        if backend is None:
            backend = choose_backend(runs, num_qo_heads, num_kv_heads, q_dtype, kv_dtype)
        elif backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
        self.backend = backend
        self._planned_q = int(runs.run_len.sum())
        if backend == "triton":
            rows, positions = query_tokens(runs)
            self._triton.plan(rows, positions, req_to_token, num_qo_heads, num_kv_heads, head_dim, sm_scale)
            return
        n_runs = runs.run_len.numel()
        qo_indptr = torch.zeros(n_runs + 1, dtype=torch.int32)
        qo_indptr[1:] = torch.cumsum(runs.run_len, 0)
        kv_indptr = torch.zeros(n_runs + 1, dtype=torch.int32)
        kv_indptr[1:] = torch.cumsum(runs.kv_len, 0)
        # Host indptrs: FlashInfer's plan reads them on the host (`.to("cpu")`), and a device tensor
        # there is a copy back that waits for every kernel queued before it — once per token set, so
        # a loop whose set changes at each layer could not run ahead of the GPU.
        self._flashinfer().plan(
            qo_indptr,
            kv_indptr,
            kv_indices_for(runs, req_to_token),
            torch.ones(n_runs, dtype=torch.int32),
            num_qo_heads,
            num_kv_heads,
            head_dim,
            1,
            causal=True,
            sm_scale=sm_scale,
            q_data_type=q_dtype,
            kv_data_type=kv_dtype,
        )

    def run(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """q: [n_active, heads, head_dim]; k/v_cache: the layer's pool buffers [slots, kv_heads, d]."""
        if self._planned_q != q.shape[0]:
            raise RuntimeError(f"planned for {self._planned_q} query tokens, got {q.shape[0]}")
        if self.backend == "triton":
            return self._triton.run(q, k_cache, v_cache)
        return self._wrapper.run(q, (k_cache, v_cache))
