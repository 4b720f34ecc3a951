"""One scheduler process's compression state: which requests compress, their captured queries, the
trimmed rows decode reads, and the allocator work of a trim and of a trimmed request's release.

The life of a compressed request (alpha < 1 for it; alpha = 1 and "off" never reach any of this):

1. every prefill chunk but the last is kept out of the radix tree (`keeps_out_of_tree`): a chunk in
   the tree would be shared and could be neither moved nor freed, so it could not be compressed;
2. right before the forward of its last chunk (`before_run_batch`), the scheduler plans which Q rows
   the forward keeps (`query_capture.py`); the RadixAttention hook (`capture_attention`) keeps them;
3. when that prefill's result is processed the cache first stores its images (whole KV), then calls
   `trim`: the step runs on the pool, `plan.free_slots` go back to SGLang's allocator, the request is
   marked trimmed and its per-layer lengths enter `kept` (what decode attends); the cache does not
   insert it into the radix tree;
4. when it finishes, aborts or is retracted the cache calls `release`: exactly
   `plan.slots_to_free_on_finish` are freed and its row of `kept` is cleared.

The selective prefill of reused images bypasses RadixAttention; it hands its active tokens' Q to
`observe_active_queries` (the composition root sets the runtime as its QueryObserver), so requests
that reuse images are compressed too. A request whose capture is incomplete anyway is served
uncompressed: counted in `stats.compress_not_captured`, never trimmed wrongly.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional, Union

import torch

from vlcache_sglang.compression.compressor import build_post_prefill_step
from vlcache_sglang.compression.config import CompressionConfig
from vlcache_sglang.compression.decode_tables import KeptLengthTable
from vlcache_sglang.compression.query_capture import BatchCapture, plan_capture
from vlcache_sglang.compression.step import (PostPrefillStep, PrefillView, clear_kv_trimmed, mark_kv_trimmed,
                                             trimmed_plan)
from vlcache_sglang.stats import VLCacheStats

logger = logging.getLogger(__name__)


def image_offsets(req: Any) -> list[tuple[int, int]]:
    """(start, end inclusive) of every image run of the request (SGLang's MultimodalDataItem.offsets)."""
    mm = getattr(req, "multimodal_inputs", None)
    out = []
    for item in getattr(mm, "mm_items", None) or []:
        out.extend((int(s), int(e)) for s, e in (item.offsets or []))
    return out


class CompressionRuntime:
    def __init__(self, compression_for: Callable[[Any], CompressionConfig], num_layers: int, num_rows: int,
                 device: Union[str, torch.device],
                 build_step: Callable[[CompressionConfig], Optional[PostPrefillStep]] = build_post_prefill_step,
                 stats: Optional[VLCacheStats] = None) -> None:
        """compression_for: the request's options (`PolicyResolver.compression_for`); num_rows:
        SGLang's ReqToTokenPool rows; device: the KV pool's; stats: the cache's counters (logged and
        exported with the rest)."""
        self._compression_for = compression_for
        self._build_step = build_step
        self._steps: dict[CompressionConfig, Optional[PostPrefillStep]] = {}
        self.num_layers = num_layers
        self.device = torch.device(device)
        self.kept = KeptLengthTable(num_rows, num_layers, device)
        self.pending: Optional[BatchCapture] = None  # the capture of the batch about to run
        self.stats = stats if stats is not None else VLCacheStats()
        self._trimmed_rows: set[int] = set()

    # ----- which requests -------------------------------------------------------------------

    def step_for(self, req: Any) -> Optional[PostPrefillStep]:
        """The step this request runs after its prefill; None when it is served uncompressed
        (compression off, or alpha = 1: the unchanged path, token for token)."""
        config = self._compression_for(req)
        if not config.enabled or config.compress_ratio >= 1.0:
            return None
        if config not in self._steps:
            self._steps[config] = self._build_step(config)
        return self._steps[config]

    def keeps_out_of_tree(self, req: Any) -> bool:
        """Whether the request's prefill chunks stay out of the radix tree (it will be compressed)."""
        return self.step_for(req) is not None

    @property
    def live_trimmed(self) -> int:
        """Trimmed requests holding KV now: while there are any, decode builds per-layer tables."""
        return len(self._trimmed_rows)

    # ----- before the forward (scheduler) ---------------------------------------------------

    def before_run_batch(self, scheduler: Any, batch: Any, *args: Any, **kwargs: Any) -> None:
        """BEFORE hook on `Scheduler.run_batch`: plan the Q rows this batch's forward keeps."""
        self.pending = None
        if batch is None or not batch.forward_mode.is_extend() or not batch.reqs:
            return
        wanted = []
        for req, prefix, extend in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            step = self.step_for(req)
            m = int(prefix) + int(extend)
            if step is None or m < len(req.full_untruncated_fill_ids):  # not its last chunk
                wanted.append(None)
                continue
            wanted.append((int(req.req_pool_idx), m, step.query_positions(m, image_offsets(req))))
        self.pending = plan_capture([int(p) for p in batch.prefix_lens], [int(e) for e in batch.extend_lens],
                                    wanted, self.device)

    # ----- during the forward (model) -------------------------------------------------------

    def wants_queries(self, forward_batch: Any) -> bool:
        capture = self.pending
        return capture is not None and forward_batch.forward_mode.is_extend() and capture.matches(forward_batch)

    def capture_attention(self, original: Callable[..., Any], attn: Any, q: torch.Tensor, k: Any, v: Any,
                          forward_batch: Any, *args: Any, **kwargs: Any) -> Any:
        """AROUND hook on `RadixAttention.forward`: keep the planned rows of this layer's q."""
        if self.wants_queries(forward_batch):
            self.pending.take(attn.layer_id, q, attn.tp_q_head_num, attn.head_dim, attn.scaling)
        return original(attn, q, k, v, forward_batch, *args, **kwargs)

    def observe_active_queries(self, attn: Any, active_rows_cpu: torch.Tensor, q: torch.Tensor,
                               forward_batch: Any) -> None:
        """The selective prefill's QueryObserver: q of its active tokens at layer `attn.layer_id`."""
        if self.wants_queries(forward_batch):
            self.pending.take_active(attn.layer_id, active_rows_cpu, q, attn.tp_q_head_num, attn.head_dim,
                                     attn.scaling)

    # ----- after the prefill (cache) --------------------------------------------------------

    def trim(self, req: Any, req_to_token: torch.Tensor, kv_pool: Any, allocator: Any) -> bool:
        """Run the request's step after its last prefill chunk; True when its KV was trimmed (the cache
        must then not insert it). Call after the images were stored (they need the whole KV)."""
        step = self.step_for(req)
        if step is None:
            return False
        capture, request = self.pending, None
        if capture is not None:
            request = next((r for r in capture.requests if r.req_pool_idx == req.req_pool_idx), None)
        if request is None or not capture.complete(self.num_layers):
            self.stats.compress_not_captured += 1
            logger.debug("vlcache: request %s not compressed: its queries were not captured", req.rid)
            return False
        view = PrefillView(
            req_pool_idx=int(req.req_pool_idx), prompt_len=request.prompt_len,
            shared_prefix_len=int(req.cache_protected_len), req_to_token=req_to_token,
            k_buffers=kv_pool.k_buffer, v_buffers=kv_pool.v_buffer, query_positions=request.positions,
            queries=capture.request_queries(request, self.num_layers), sm_scale=float(capture.sm_scale))
        result = step.run(view)
        if not result.kv_trimmed:
            return False
        plan = result.plan
        allocator.free(plan.free_slots)
        mark_kv_trimmed(req, plan)
        self.kept.set(int(req.req_pool_idx), plan)
        self._trimmed_rows.add(int(req.req_pool_idx))
        self.stats.compressed_requests += 1
        self.stats.compress_freed_slots += int(plan.free_slots.numel())
        self.stats.compress_kept_token_layers += sum(plan.kept_lengths)
        self.stats.compress_prompt_token_layers += plan.num_layers * plan.prompt_len
        logger.debug("vlcache: request %s compressed: %s", req.rid, result.info)
        return True

    def release(self, req: Any, req_to_token: torch.Tensor, allocator: Any, kv_len: int) -> bool:
        """A trimmed request leaves (finish, abort, retraction): free what its plan says; True if it was
        trimmed (the cache then does nothing else with its KV but unlock its prefix)."""
        plan = trimmed_plan(req)
        if plan is None:
            return False
        row = int(req.req_pool_idx)
        allocator.free(plan.slots_to_free_on_finish(req_to_token[row], kv_len))
        self.kept.clear(row)
        self._trimmed_rows.discard(row)
        clear_kv_trimmed(req)  # a retracted request is prefilled (and maybe trimmed) again
        return True
