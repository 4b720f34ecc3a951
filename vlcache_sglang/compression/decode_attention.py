"""SGLang's Triton decode backend over per-layer kept sets (compressed requests).

SGLang's Triton decode kernel (`decode_attention_fwd`) takes `kv_indptr` / `kv_indices` per call,
and the backend's `forward_decode` reads them from `forward_metadata` (as it already picks
`window_kv_indptr` for sliding-window layers). Two AROUND hooks on `TritonAttnBackend`:

* `init_forward_metadata`: after SGLang's own, while any trimmed request holds KV, every layer's
  table of the decode batch is built in one launch from `req_to_token` and the device-side kept
  lengths (`kernels/kept_kv_indices.py`; untrimmed rows get SGLang's own row[0 : seq_len]) and
  attached to that metadata object;
* `forward_decode`: when the metadata carries layer tables, layer l runs with kv_indptr /
  kv_indices of row l; otherwise SGLang's code runs untouched.

`num_kv_splits` stays SGLang's (sized from the full seq_lens): a kept length is never longer, and
a split past a request's end is empty, which the kernel's second stage skips; per-layer splits are
a speed question for the GPU. `seq_lens` stays the true length, so positions (M-RoPE delta
included) are unchanged. CUDA graphs: the graph's metadata hooks (`decode_graph.py`) attach the
same `LayerTables`, views of fixed buffers, at capture, so the captured `forward_decode` reads them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from vlcache_sglang.compression.decode_tables import KeptLengthTable

LAYER_TABLES_ATTR = "vlcache_layer_tables"  # on the backend's ForwardMetadata of a decode batch


@dataclass(frozen=True)
class LayerTables:
    kv_indptr: torch.Tensor  # [L, bs + 1] int32
    kv_indices: torch.Tensor  # [L, capacity] int32


class KeptDecodeAttention:
    def __init__(self, kept: Optional[KeptLengthTable] = None, live_trimmed: Callable[[], int] = lambda: 0) -> None:
        """kept: the runtime's per-(row, layer) lengths; live_trimmed: how many trimmed requests hold KV.
        Unbound (the hooks go in before SGLang captures its decode graphs, earlier than the runtime
        exists) it serves no trimmed request; `bind` hands the runtime's over."""
        self.kept = kept
        self._live_trimmed = live_trimmed

    def bind(self, kept: KeptLengthTable, live_trimmed: Callable[[], int]) -> None:
        self.kept = kept
        self._live_trimmed = live_trimmed

    def live_trimmed(self) -> int:
        return self._live_trimmed()

    def around_init_forward_metadata(self, original: Callable[..., Any], backend: Any, forward_batch: Any,
                                     *args: Any, **kwargs: Any) -> Any:
        result = original(backend, forward_batch, *args, **kwargs)
        if forward_batch.forward_mode.is_decode() and self.live_trimmed() > 0:
            setattr(backend.forward_metadata, LAYER_TABLES_ATTR, self.layer_tables(backend, forward_batch))
        return result

    def layer_tables(self, backend: Any, forward_batch: Any) -> LayerTables:
        """Every layer's table of the decode batch; capacity = the batch's total length (a kept table is
        never longer than its request), known on the host in eager decode (no synchronisation)."""
        capacity = forward_batch.seq_lens_sum
        indices = None
        if capacity is not None:
            indices = torch.empty(self.kept.num_layers, max(int(capacity), 1), dtype=torch.int32,
                                  device=backend.req_to_token.device)
        kv_indptr, kv_indices = self.kept.tables(backend.req_to_token, forward_batch.req_pool_indices,
                                                 forward_batch.seq_lens, kv_indices=indices)
        return LayerTables(kv_indptr, kv_indices)

    def around_forward_decode(self, original: Callable[..., Any], backend: Any, q: torch.Tensor, k: Any, v: Any,
                              layer: Any, forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        metadata = backend.forward_metadata
        tables = getattr(metadata, LAYER_TABLES_ATTR, None)
        if tables is None:
            return original(backend, q, k, v, layer, forward_batch, *args, **kwargs)
        lid = layer.layer_id
        backend.forward_metadata = dataclasses.replace(metadata, kv_indptr=tables.kv_indptr[lid],
                                                       kv_indices=tables.kv_indices[lid])
        try:
            return original(backend, q, k, v, layer, forward_batch, *args, **kwargs)
        finally:
            backend.forward_metadata = metadata
