"""CUDA graphs of the selective decoder loop, one per padded active-token count (bucket).

A reuse prefill under `none` or `first_k` runs a few hundred tokens through every layer: about a
dozen small kernels a layer, so eagerly the pass is bound by the host (profiled on an H100: 15-35 ms
for 55-335 tokens through 28 layers, the same as a stock one-token prefix hit). One graph replay
launches them all. SGLang captures decode only and runs Qwen2.5-VL prefill eagerly, so these graphs
are ours: captured at the first reuse batch that can use one (all buckets, largest first, one
memory pool), replayed for every later one.

A batch takes a graph when every layer's token set is known before the forward (`none`, `first_k`,
`vlcache`, with or without a profile: not an observing policy), S_0 fits the largest bucket and the
attention tiles fit its capacity; otherwise the eager loop runs. A set that shrinks across layers
runs as S_0 at every layer with per-layer write slots: layer l writes the K/V of S_l's tokens and
sends the others' to slot 0, so their cached K/V stays, as in the eager loop. That computes |S_0|
tokens per layer instead of |S_l| (charged so: `LayerSelector.charge_first_set`), but in one replay:
for the few hundred tokens that fit a bucket the eager loop is bound by kernel launches. A stepped
plan (a profile made a step function, `--vlcache-profile-levels`: its sets change only at the starts
of a few layer segments, captured too when the server's own policy has them) runs one graph per
segment instead, each padded to its own set's bucket, the hidden states gathered between them: it
computes |S_l| per layer, as the eager loop, in a few replays.
Inside a graph, attention is the Triton scattered kernel in fixed-capacity mode: its tile table is
refilled before each replay and its grid is fixed (FlashInfer's graph mode fixes the number of
runs, which varies from batch to batch here). Padding tokens write their K/V to slot 0, the slot
SGLang reserves for padded writes, and their attention output is zero.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

import torch

from vlcache_sglang.kernels.scattered_attention import CapacityError, ScatteredAttention
from vlcache_sglang.model_patch.selective_attention import RunLayout, query_tokens
from vlcache_sglang.model_patch.selective_layers import layer_range
from vlcache_sglang.recompute_policy import RecomputePolicy

ENV_VAR = "VLCACHE_CUDA_GRAPH"  # "0" turns the graphs off (the eager loop runs every batch)
BUCKETS = (32, 64, 128, 256, 512, 1024)
MAX_REQUESTS_PER_GRAPH = 64  # tiles a bucket holds beyond its full ones: one partial tile per request
logger = logging.getLogger(__name__)


def why_not_graphs(lm: Any, model_dtype: torch.dtype, kv_dtype: torch.dtype) -> Optional[str]:
    """None when the selective loop of this server may run in CUDA graphs, else the reason."""
    if os.environ.get(ENV_VAR, "1") == "0":
        return f"{ENV_VAR}=0"
    if not torch.cuda.is_available():
        return "no CUDA device"
    from sglang.srt.distributed import get_tensor_model_parallel_world_size
    from sglang.srt.server_args import get_global_server_args

    if get_global_server_args().disable_cuda_graph:
        return "--disable-cuda-graph"
    if get_tensor_model_parallel_world_size() != 1:
        return "tensor parallelism (o_proj/down_proj all-reduce inside the graph is not set up)"
    if lm.start_layer != 0 or lm.end_layer != len(lm.layers):
        return "pipeline parallelism"
    if not ScatteredAttention.supports(model_dtype, kv_dtype):
        return f"KV cache dtype {kv_dtype} with model dtype {model_dtype} (the Triton kernel needs one 16/32-bit dtype)"
    return None


@dataclasses.dataclass
class _Graph:
    """One bucket's graph of layers [lo, hi) (all of them, or one segment of a stepped plan)."""
    replay: Callable[[], None]
    hidden: torch.Tensor  # [bucket, hidden]: static input, the active tokens' embeddings (or layer lo's input)
    residual: Optional[torch.Tensor]  # [bucket, hidden]: layer lo's residual input; None from the first layer
    positions: torch.Tensor  # [3, bucket]: M-RoPE positions
    out_loc: torch.Tensor  # [hi - lo, bucket]: KV slots the tokens write at each layer
    attention: ScatteredAttention  # fixed capacity: its tile table is refilled per batch
    # static output: after the final norm [bucket, hidden] if hi is the last layer, else [2, bucket,
    # hidden] (layer hi's hidden and residual inputs)
    out: torch.Tensor


@dataclasses.dataclass(frozen=True)
class SegmentInput:
    """One segment [lo, hi) of a stepped plan: its tokens computed at every layer of it."""
    lo: int
    hi: int
    keep: Optional[torch.Tensor]  # its tokens' indices among the previous segment's (None: the first)
    positions: torch.Tensor  # [3, n]
    out_loc: torch.Tensor  # [n]: KV slots, the same at each of its layers
    runs: RunLayout


def layer_segments(ratios: Optional[Sequence[float]]) -> tuple[tuple[int, int], ...]:
    """The runs of equal per-layer ratios as layer ranges [lo, hi) — where a stepped profile's sets stay
    the same (`layer_profile.step_ratios`); () without ratios or with one run (one set: the plain graph)."""
    if not ratios:
        return ()
    cuts = [0] + [l for l in range(1, len(ratios)) if ratios[l] != ratios[l - 1]] + [len(ratios)]
    return tuple(zip(cuts, cuts[1:])) if len(cuts) > 2 else ()


def tail_starts(policy: RecomputePolicy, num_layers: int) -> tuple[int, ...]:
    """First layers of the ranges [lo, L) worth a graph after a check layer: an observing policy's sets
    stop changing after its check layer c, so [c+1, L) replays as one. () for static plans and for a
    probe, whose decision replans every layer from 0 (the rerun takes the layer-invariant graph)."""
    if not policy.observes(num_layers) or policy.probes:
        return ()
    return (policy.params.check_layer + 1,)


@dataclasses.dataclass(frozen=True)
class AttentionShape:
    num_qo_heads: int
    num_kv_heads: int
    head_dim: int
    sm_scale: float

    @classmethod
    def of(cls, lm: Any) -> "AttentionShape":
        radix = lm.layers[lm.start_layer].self_attn.attn
        return cls(radix.tp_q_head_num, radix.tp_k_head_num, radix.head_dim, radix.scaling)


def bucket_for(n: int, buckets: tuple[int, ...] = BUCKETS) -> Optional[int]:
    """The smallest of the (ascending) buckets holding n tokens (None when none does)."""
    return next((b for b in buckets if n <= b), None)


def tile_capacity(bucket: int, shape: AttentionShape) -> int:
    return -(-bucket // ScatteredAttention.block_m(shape.num_qo_heads, shape.num_kv_heads)) + MAX_REQUESTS_PER_GRAPH


class SelectiveGraphs:
    """Captures (once) and replays the graphs of one server's selective decoder loop."""

    def __init__(self, buckets: tuple[int, ...] = BUCKETS,
                 why_not: Callable[[Any, torch.dtype, torch.dtype], Optional[str]] = why_not_graphs,
                 segments: Sequence[tuple[int, int]] = (), tails: Sequence[int] = ()) -> None:
        """why_not(lm, model dtype, KV dtype): asked once, before the first capture (tests replace it).
        `segments`: layer ranges [lo, hi) of a stepped plan (`layer_segments`), captured besides all
        layers; `tails`: first layers lo of ranges [lo, last], one segment run after a check layer;
        both set before the capture."""
        self._buckets = tuple(sorted(buckets))
        self._why_not = why_not
        self._graphs: dict[tuple[int, int, int], _Graph] = {}  # (lo, hi, bucket)
        self.segments = tuple(segments)
        self.tails = tuple(tails)
        self._shape: Optional[AttentionShape] = None  # the model's, set at capture
        self._pool: Any = None
        self.disabled: Optional[str] = None  # why graphs are not used (set once, logged once)

    def fits(self, n: int) -> bool:
        """Whether a batch of n active tokens could take a graph (so its inputs are worth building)."""
        return self.disabled is None and n <= self._buckets[-1]

    def run(self, lm: Any, hidden: torch.Tensor, positions: torch.Tensor, layer_out_loc: torch.Tensor,
            runs: RunLayout, req_to_token: torch.Tensor, pool: Any) -> Optional[torch.Tensor]:
        """All layers and the final norm for the n active tokens (hidden [n, H], positions [3, n],
        layer_out_loc [L, n]: each layer's write slots, 0 = keep the cached K/V; their runs) through a
        graph: [n, H], valid until the next replay. None when this batch cannot use one; the caller
        runs the eager loop."""
        n = hidden.shape[0]
        bucket = bucket_for(n, self._buckets)
        if self.disabled is not None or bucket is None:
            return None
        if not self._graphs and not self.capture(lm, hidden.dtype, hidden.shape[-1], layer_out_loc.dtype,
                                                 req_to_token, pool):
            return None
        g = self._graphs[(lm.start_layer, lm.end_layer, bucket)]
        if not self._plan(g, runs, req_to_token):
            return None
        _fill(g.hidden, hidden)
        _fill(g.positions, positions, dim=1)
        _fill(g.out_loc, layer_out_loc, dim=1)  # padding writes slot 0
        g.replay()
        return g.out[:n]

    def run_segments(self, lm: Any, hidden: torch.Tensor, segments: Sequence[SegmentInput], req_to_token: torch.Tensor,
                     pool: Any, residual: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """A stepped plan (its sets change only where `segments` start) through one graph per segment,
        each padded to its own set's bucket: the hidden states of the last segment's tokens after the
        final norm, [n_last, H]; None when some segment has no captured graph or its bucket's tile table
        is too small (nothing replayed yet: the caller takes another path). hidden: [n_0, H], the first
        segment's input: the tokens' embeddings, or, with `residual` [n_0, H], the eager loop's state
        at a later first layer (a tail after a check layer)."""
        if self.disabled is not None or not segments:
            return None
        if not self._graphs and not self.capture(lm, hidden.dtype, hidden.shape[-1], segments[0].out_loc.dtype,
                                                 req_to_token, pool):
            return None
        graphs = []
        for seg in segments:  # every plan first: a fallback must not follow half the replays
            bucket = bucket_for(seg.positions.shape[1], self._buckets)
            g = self._graphs.get((seg.lo, seg.hi, bucket)) if bucket is not None else None
            if g is None or not self._plan(g, seg.runs, req_to_token):
                return None
            graphs.append(g)
        for seg, g in zip(segments, graphs):
            n = seg.positions.shape[1]
            if seg.keep is not None:  # copies out of the previous graph's static output
                hidden, residual = out[0, seg.keep], out[1, seg.keep]
            _fill(g.hidden, hidden)
            if g.residual is not None:
                _fill(g.residual, residual)
            _fill(g.positions, seg.positions, dim=1)
            _fill(g.out_loc, seg.out_loc.expand(seg.hi - seg.lo, -1), dim=1)
            g.replay()
            out = g.out[..., :n, :]
        return out

    def _plan(self, g: _Graph, runs: RunLayout, req_to_token: torch.Tensor) -> bool:
        """Refill g's tile table for these runs; False when more requests than it holds."""
        shape = self._shape
        try:
            g.attention.plan(*query_tokens(runs), req_to_token, shape.num_qo_heads, shape.num_kv_heads,
                             shape.head_dim, shape.sm_scale)
        except CapacityError:
            return False
        return True

    def capture(self, lm: Any, dtype: torch.dtype, hidden_size: int, loc_dtype: torch.dtype,
                req_to_token: torch.Tensor, pool: Any) -> bool:
        """Capture every bucket's graph of all layers, and of each layer range in `segments`, once; the
        server calls it at start-up, so no request pays for it. False, with `disabled` saying why, when
        this server runs the eager loop instead."""
        if self._graphs:
            return True
        if self.disabled is not None:
            return False
        self.disabled = self._why_not(lm, dtype, pool.k_buffer[0].dtype)
        if self.disabled is not None:
            logger.info("vlcache: selective prefill without CUDA graphs (%s)", self.disabled)
            return False
        t0 = time.perf_counter()
        self._shape = AttentionShape.of(lm)
        try:
            self._pool = torch.cuda.graph_pool_handle() if torch.cuda.is_available() else None
            ranges = [(lm.start_layer, lm.end_layer), *self.segments,
                      *((lo, lm.end_layer) for lo in self.tails if lm.start_layer < lo < lm.end_layer)]
            for bucket in reversed(self._buckets):  # largest first: the smaller ones reuse its memory
                for lo, hi in dict.fromkeys(ranges):
                    self._graphs[(lo, hi, bucket)] = self._capture(bucket, lo, hi, lm, dtype, hidden_size, loc_dtype,
                                                                   req_to_token, pool)
        except Exception as exc:  # noqa: BLE001 - any capture failure leaves the eager loop, which works
            self._graphs.clear()
            self.disabled = f"capture failed: {type(exc).__name__}: {exc}"
            logger.warning("vlcache: CUDA graphs of the selective prefill off (%s); the eager loop runs", self.disabled)
            return False
        logger.info("vlcache: captured %d CUDA graphs of the selective prefill (buckets %s tokens%s) in %.0f ms",
                    len(self._graphs), list(self._buckets),
                    (f"; layer segments {list(self.segments)}" if self.segments else "")
                    + (f"; tails from layers {list(self.tails)}" if self.tails else ""),
                    1000 * (time.perf_counter() - t0))
        return True

    def _capture(self, bucket: int, lo: int, hi: int, lm: Any, dtype: torch.dtype, hidden_size: int,
                 loc_dtype: torch.dtype, req_to_token: torch.Tensor, pool: Any) -> _Graph:
        device, shape = req_to_token.device, self._shape
        hidden = torch.zeros(bucket, hidden_size, dtype=dtype, device=device)
        residual = torch.zeros_like(hidden) if lo > lm.start_layer else None
        positions = torch.zeros(3, bucket, dtype=torch.int64, device=device)
        out_loc = torch.zeros(hi - lo, bucket, dtype=loc_dtype, device=device)  # capture-time writes: slot 0
        attention = ScatteredAttention(capacity=(bucket, tile_capacity(bucket, shape)))
        empty = torch.empty(0, dtype=torch.int64)
        attention.plan(empty, empty, req_to_token, shape.num_qo_heads, shape.num_kv_heads, shape.head_dim,
                       shape.sm_scale)

        def body() -> torch.Tensor:
            return layer_range(lm, lo, hi, positions, hidden, residual, out_loc, pool, attention)

        replay, out = cuda_graph_capture(body, self._pool, device)
        return _Graph(replay, hidden, residual, positions, out_loc, attention, out)


def cuda_graph_capture(body: Callable[[], torch.Tensor], pool: Any,
                       device: torch.device) -> tuple[Callable[[], None], torch.Tensor]:
    """body() captured in a CUDA graph: (replay, the graph's static output)."""
    # Warm-up outside the capture (Triton compiles, cuBLAS picks its kernels), on a side stream
    # as torch's graph docs ask.
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        body()
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, capture_error_mode="thread_local"):
        out = body()
    return graph.replay, out


def _fill(static: torch.Tensor, value: torch.Tensor, dim: int = 0) -> None:
    """value into the start of a static buffer along dim, zeros after it."""
    n = value.shape[dim]
    static.narrow(dim, 0, n).copy_(value)
    static.narrow(dim, n, static.shape[dim] - n).zero_()
