"""CUDA graphs for decode batches over per-layer kept tables (compressed requests).

SGLang's Triton backend captures each decode graph with `kv_indptr` / `kv_indices` pointing into
fixed buffers and, before each replay, refills those buffers outside the graph
(`init_forward_metadata_out_graph`); the Python `forward_decode` runs only at capture. Three hooks:

* `init_cuda_graph_state` (AFTER): per-layer buffers besides SGLang's, `kv_indptr [L, max_bs + 1]`
  and `kv_indices [L, capacity]` int32, capacity = the KV pool's slots + max_bs (any layer's table
  is never longer than the batch's seq_lens_sum; padded rows add one slot each);
* `init_forward_metadata_out_graph` (AROUND): after SGLang's own fill, one `kept_kv_indices` launch
  fills every layer's table from `req_to_token` and the device-side kept lengths (untrimmed rows and
  the padding row 0 get SGLang's row[0 : seq_len]); at capture the tables are attached to the
  metadata, so the captured `forward_decode` of layer l reads row l of the buffers
  (`decode_attention.KeptDecodeAttention`);
* `DecodeCudaGraphRunner.can_run_graph` (AROUND): eager only where the buffers cannot hold the batch
  (counted in `compress_graph_fallbacks`).

Decision: with compression on, every decode graph is captured with the per-layer path, trimmed
request in the batch or not. A stock graph cannot serve a trimmed row, and keeping a second set of
graphs (stock and per-layer) would double capture time and graph memory for a batch the per-layer
graph already serves exactly: with all lengths zero the per-layer tables are SGLang's table L times,
so the same kernel reads the same slots (bit-equal to stock). The price is one launch per step that
writes L copies of the table, small next to attention reading the KV.

These hooks must be in place before SGLang captures its graphs (`Scheduler.init_model_worker`),
earlier than the compression runtime exists (so are the eager path's `KeptDecodeAttention` hooks,
whose `forward_decode` the capture records); the graphs capture over an all-zero length table and
`bind` hands over the runtime's once the cache is built (`plugin.install_scheduler`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from vlcache_sglang.compression.decode_attention import LAYER_TABLES_ATTR, KeptDecodeAttention, LayerTables
from vlcache_sglang.compression.decode_tables import KeptLengthTable
from vlcache_sglang.stats import VLCacheStats

GRAPH_BUFFERS_ATTR = "vlcache_graph_tables"  # on a TritonAttnBackend whose decode graphs are per-layer


@dataclass(frozen=True)
class GraphBuffers:
    kv_indptr: torch.Tensor  # [L, max_bs + 1] int32
    kv_indices: torch.Tensor  # [L, capacity] int32

    @property
    def max_bs(self) -> int:
        return self.kv_indptr.shape[1] - 1

    @property
    def capacity(self) -> int:
        return self.kv_indices.shape[1]

    def fits(self, batch_size: int, seq_lens_sum: Optional[int]) -> bool:
        """Whether any layer's table of the batch, padded to a captured size, fits (host values only).
        Without seq_lens_sum it could only be known by reading the lengths back (a synchronisation)."""
        if seq_lens_sum is None or batch_size > self.max_bs:
            return False
        return int(seq_lens_sum) + (self.max_bs - batch_size) <= self.capacity


def graph_buffers(backend: Any) -> Optional[GraphBuffers]:
    """The per-layer buffers of the backend that decodes. With `--attention-backend flashinfer
    --decode-attention-backend triton` the graph runner holds SGLang's HybridAttnBackend, whose
    decode_backend is the TritonAttnBackend the buffers were allocated on (missing them there ran
    every trimmed batch eagerly: H200, 2026-12-01)."""
    return getattr(getattr(backend, "decode_backend", backend), GRAPH_BUFFERS_ATTR, None)


def _is_plain_decode(forward_batch: Any) -> bool:
    return forward_batch.forward_mode.is_decode() and getattr(forward_batch, "spec_info", None) is None


class KeptDecodeGraph:
    def __init__(self, decode: KeptDecodeAttention) -> None:
        """decode: the eager path's hooks, whose kept lengths and live count the graph path shares."""
        self.decode = decode
        self._capture_kept: Optional[KeptLengthTable] = None  # all zeros: what graphs capture over
        self.stats = VLCacheStats()  # the runtime's after `bind`

    def bind(self, kept: KeptLengthTable, live_trimmed: Callable[[], int], stats: VLCacheStats) -> None:
        """Hand over the runtime's kept lengths (what eager steps and replays read from now on) and counters."""
        captured = self._capture_kept
        if captured is not None and captured.kept_lens.shape != kept.kept_lens.shape:
            raise ValueError(f"decode graphs were captured for kept lengths {tuple(captured.kept_lens.shape)} "
                             f"(rows, layers); the runtime has {tuple(kept.kept_lens.shape)}")
        self.decode.bind(kept, live_trimmed)
        self.stats = stats

    @property
    def kept(self) -> Optional[KeptLengthTable]:
        return self.decode.kept if self.decode.kept is not None else self._capture_kept

    def after_init_cuda_graph_state(self, result: Any, backend: Any, max_bs: int, max_num_tokens: int,
                                    kv_indices_buf: Optional[torch.Tensor] = None, *args: Any, **kwargs: Any) -> None:
        # A shared kv_indices_buf is the multi-step draft backend (speculative decoding): its batches carry
        # spec_info, which the per-layer path never serves, so it gets no buffers.
        if kv_indices_buf is not None:
            return
        if getattr(backend, "_translate_kv_loc", None) is not None or getattr(backend, "dcp_size", 1) > 1:
            raise NotImplementedError("compression's decode graphs support SGLang's plain MHA pool (no unified "
                                      "pool, no decode context parallelism); drop --vlcache-compress-ratio")
        pool = backend.token_to_kv_pool
        layers, rows = pool.layer_num, backend.req_to_token.shape[0]
        if self._capture_kept is None:
            self._capture_kept = KeptLengthTable(rows, layers, backend.device)
        device = backend.device
        setattr(backend, GRAPH_BUFFERS_ATTR, GraphBuffers(
            kv_indptr=torch.zeros(layers, max_bs + 1, dtype=torch.int32, device=device),
            kv_indices=torch.zeros(layers, pool.size + max_bs, dtype=torch.int32, device=device)))

    def around_init_forward_metadata_out_graph(self, original: Callable[..., Any], backend: Any, forward_batch: Any,
                                               in_capture: bool = False) -> Any:
        result = original(backend, forward_batch, in_capture=in_capture)
        buffers = graph_buffers(backend)
        if buffers is None or not _is_plain_decode(forward_batch):
            return result
        tables = self.fill(backend, buffers, forward_batch)
        if in_capture:  # the captured forward_decode reads these views; replays only refill them
            setattr(backend.forward_metadata, LAYER_TABLES_ATTR, tables)
        return result

    def fill(self, backend: Any, buffers: GraphBuffers, forward_batch: Any) -> LayerTables:
        """Every layer's table of the (padded) batch into the fixed buffers, in one launch."""
        kv_indptr, kv_indices = self.kept.tables(backend.req_to_token, forward_batch.req_pool_indices,
                                                  forward_batch.seq_lens, buffers.kv_indptr, buffers.kv_indices)
        return LayerTables(kv_indptr, kv_indices)

    def around_can_run_graph(self, original: Callable[..., Any], runner: Any, forward_batch: Any,
                             *args: Any, **kwargs: Any) -> bool:
        """AROUND hook on the decode CUDA-graph runner: eager where the per-layer buffers cannot hold
        the batch (counted), or, on a backend captured stock, while a trimmed request is live."""
        can = original(runner, forward_batch, *args, **kwargs)
        if not can or not _is_plain_decode(forward_batch):
            return can
        buffers = graph_buffers(runner.attn_backend)
        if buffers is None:
            return self.decode.live_trimmed() == 0
        if buffers.fits(forward_batch.batch_size, forward_batch.seq_lens_sum):
            return True
        self.stats.compress_graph_fallbacks += 1
        return False
