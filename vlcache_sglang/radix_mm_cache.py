"""MultimodalRadixCache: SGLang's RadixCache plus non-prefix image nodes keyed by image key.

An image node holds its own copy of one image's KV slots (all layers), the M-RoPE start position
the image had when that KV was computed, its grid and token count. It is an ordinary child of the
root whose RadixKey lives in a private `extra_key` namespace (`ImageNodeKey`), so no request's
prefix can ever match it, while everything RadixCache does for nodes applies to it unchanged:
lock refs, `evictable_size`/`protected_size` (SGLang's idle invariant keeps holding), LRU eviction
under memory pressure, and `reset()` on /flush_cache. Prefix hits stay zero-copy.

Life of an image node:
* stored (`store_image`) when a request that computed the image in full is cached: new slots are
  allocated and the image's KV copied in (copy-rotate kernel with δ = 0);
* looked up (`lookup_image`) when a later request holds the same image after its matched prefix;
  a key whose grid or token count differs is a miss, counted. Nodes are keyed by (namespace, image
  key), the namespace being the request's `extra_key` (cache_salt ‖ extra_key ‖ LoRA id, as SGLang
  keeps salted prefixes apart): reused KV carries the context of the request that computed it, and
  a hit shows in `cached_tokens` and TTFT, so it never crosses tenants;
* locked from scheduling until that request's prefill is cached (`lock_for`/`release_for`);
* evicted LRU-first, by SGLang's `evict()` under pressure or to keep the store under its bound.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from array import array
from typing import TYPE_CHECKING, Optional

import torch
from sglang.srt.mem_cache.base_prefix_cache import EvictParams, InsertParams
from sglang.srt.mem_cache.cache_init_params import CacheInitParams
from sglang.srt.mem_cache.radix_cache import RadixCache, RadixKey, TreeNode

from vlcache_sglang.compression.step import is_kv_trimmed
from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.layer_selector import ReuseOutcome
from vlcache_sglang.recompute_policy import RecomputePolicy
from vlcache_sglang.request_policy import PolicyResolver
from vlcache_sglang.setup_checks import VLCacheSetupError, check_architecture
from vlcache_sglang.stats import VLCacheStats

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req

    from vlcache_sglang.compression.runtime import CompressionRuntime
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageNodeKey:
    """`extra_key` of an image node: a namespace no request's extra_key (str or None) equals."""

    image_key: int
    namespace: Optional[str] = None  # the storing request's extra_key


@dataclasses.dataclass(frozen=True)
class ImageEntry:
    """What an image node knows about the KV it holds."""

    image_key: int
    start_pos: int  # M-RoPE start `st` of the image when its KV was computed
    grid_thw: tuple[int, int, int]
    num_tokens: int
    namespace: Optional[str] = None  # extra_key of the request that computed it (Req.extra_key)


class MultimodalRadixCache(RadixCache):
    def __init__(
        self,
        params: CacheInitParams,
        config: VLCacheConfig,
        max_store_tokens: int,
        num_layers: int,
        inv_freq: Optional[torch.Tensor] = None,
    ) -> None:
        self.config = config
        self.max_store_tokens = max_store_tokens
        self.num_layers = num_layers
        self.inv_freq = inv_freq  # rotary inverse frequencies, for the copy-rotate kernel
        self.policies = PolicyResolver(config, num_layers)
        self.stats = VLCacheStats()
        self.metrics = None  # VLCacheMetrics when the server exports metrics
        # Set by the composition root when --vlcache-compress-ratio is on (plugin.install_scheduler).
        self.compression: Optional["CompressionRuntime"] = None
        self._image_nodes: dict[tuple[Optional[str], int], TreeNode] = {}
        super().__init__(params)

    def publish_stats(self) -> None:
        """Log the counters now and then; export them when --enable-metrics is on."""
        self.stats.maybe_log()
        if self.metrics is not None:
            self.metrics.publish(self.stats)

    @property
    def policy(self) -> RecomputePolicy:
        """The server's own policy (requests without an override)."""
        return self.policies.default

    def policy_for(self, req: "Req") -> RecomputePolicy:
        """The policy this request's reuse runs under (the server's, or its own override)."""
        return self.policies.for_request(req)

    def count_outcome(self, outcome: ReuseOutcome) -> None:
        """Per-layer recompute counts of one request chunk, once its forward decided every layer."""
        self.stats.reused_token_layers += outcome.reused_tokens * outcome.num_layers
        self.stats.recomputed_token_layers += outcome.computed_token_layers
        self.publish_stats()  # else /metrics would lag by one batch

    # ----- image nodes -------------------------------------------------------------------------

    def lookup_image(
        self, image_key: int, grid_thw: Optional[tuple[int, int, int]], num_tokens: int, count: bool = True,
        namespace: Optional[str] = None,
    ) -> Optional[TreeNode]:
        """The image node for (`namespace`, `image_key`) if its grid and token count match the request's.

        `namespace`: the request's `extra_key`. `count=False` for the later chunks of an image split
        by chunked prefill (counted once)."""
        node = self._image_nodes.get((namespace, image_key))
        if node is None:
            self.stats.key_misses += count
            return None
        if self.peek_image(image_key, grid_thw, num_tokens, namespace) is None:
            entry: ImageEntry = node.vl_entry
            self.stats.key_mismatches += count
            logger.warning("vlcache: key %032x found with grid %s/%d tokens, request has %s/%d: miss",
                           image_key, entry.grid_thw, entry.num_tokens, grid_thw, num_tokens)
            return None
        self.stats.key_hits += count
        node.last_access_time = time.monotonic()
        node.hit_count += count  # SGLang's LFU / SLRU eviction ranks by it, as for prefix hits
        return node

    def peek_image(self, image_key: int, grid_thw: Optional[tuple[int, int, int]], num_tokens: int,
                   namespace: Optional[str] = None) -> Optional[TreeNode]:
        """`lookup_image` without counting, logging or touching the LRU clock (for the scheduler's
        admission, which asks before the planner does)."""
        node = self._image_nodes.get((namespace, image_key))
        if node is None or grid_thw is None:
            return None
        entry: ImageEntry = node.vl_entry
        return node if entry.grid_thw == tuple(grid_thw) and entry.num_tokens == num_tokens else None

    def has_image(self, image_key: int, namespace: Optional[str] = None) -> bool:
        return (namespace, image_key) in self._image_nodes

    def store_image(self, entry: ImageEntry, src_slots: torch.Tensor) -> bool:
        """Copy one image's KV (all layers) from `src_slots` into slots owned by a new image node."""
        if self.disable or (entry.namespace, entry.image_key) in self._image_nodes:
            return False
        n = entry.num_tokens
        if src_slots.numel() != n:
            raise ValueError(f"{src_slots.numel()=} != {entry.num_tokens=}")
        if n > self.max_store_tokens or not self._make_store_room(n):
            self.stats.store_skipped += 1
            return False
        slots = self._alloc_slots(n)
        if slots is None:
            self.stats.store_skipped += 1
            return False
        self.copy_kv(src_slots, slots, delta=0)
        key = RadixKey(array("q", [_pad_value(entry.image_key)] * n),
                       extra_key=ImageNodeKey(entry.image_key, entry.namespace))
        result = self.insert(InsertParams(key=key, value=slots))
        node = result.last_device_node
        assert result.prefix_len == 0 and len(node.key) == n, f"{result.prefix_len=}, {len(node.key)=}, {n=}"
        node.vl_entry = entry
        self._image_nodes[(entry.namespace, entry.image_key)] = node
        self.stats.stored_images += 1
        self._account(n)
        return True

    @property
    def image_store_tokens(self) -> int:
        return self.stats.store_tokens

    # ----- RadixCache overrides ----------------------------------------------------------------

    def cache_unfinished_req(self, req: "Req", chunked: bool = False) -> None:
        assert not is_kv_trimmed(req), f"request {req.rid} cached again after its KV was trimmed"
        self._after_prefill(req, kv_len=len(req.get_fill_ids()))  # images stored while the KV is whole
        runtime = self.compression
        if runtime is not None and not self.disable and runtime.keeps_out_of_tree(req):
            if chunked:
                # A chunk in the tree would be shared: neither movable nor freeable by the trim.
                self._keep_out_of_tree(req)
                return
            allocator = self.token_to_kv_pool_allocator
            trimmed = runtime.trim(req, self.req_to_token_pool.req_to_token, allocator.get_kvcache(), allocator)
            self.publish_stats()
            if trimmed:
                return  # trimmed KV is not the prompt's KV: never inserted
        super().cache_unfinished_req(req, chunked=chunked)

    def cache_finished_req(self, req: "Req", is_insert: bool = True, *, kv_len_to_handle: int) -> None:
        if is_kv_trimmed(req):
            self._after_prefill(req, kv_len=0)  # unlock image nodes; its images were stored before the trim
            self.compression.release(req, self.req_to_token_pool.req_to_token, self.token_to_kv_pool_allocator,
                                     kv_len_to_handle)
            if req.last_node is not None:
                self.dec_lock_ref(req.last_node)  # the matched prefix it attended in place
            return
        self._after_prefill(req, kv_len=kv_len_to_handle if is_insert else 0)
        super().cache_finished_req(req, is_insert, kv_len_to_handle=kv_len_to_handle)

    def _keep_out_of_tree(self, req: "Req") -> None:
        """A chunk of a request that will be compressed: as SGLang's ChunkCache, the next chunk continues
        after the slots written so far; prefix, lock and cache_protected_len stay the matched prefix's."""
        row = self.req_to_token_pool.req_to_token[req.req_pool_idx, : len(req.get_fill_ids())]
        req.prefix_indices = row.to(dtype=torch.int64, copy=True)

    def _after_prefill(self, req: "Req", kv_len: int) -> None:
        """Release the request's image-node locks; store the images it computed in full.

        Runs before RadixCache inserts the request (which frees slots the tree already holds), so
        the request's own slots still carry its KV."""
        from vlcache_sglang.reuse_planner import image_grid, image_items, image_start_pos, req_state

        state = req_state(req)
        for node in state.locked:
            self.dec_lock_ref(node)
        state.locked.clear()
        mm = req.multimodal_inputs
        if mm is None or req.req_pool_idx is None or self.disable:
            return
        namespace = getattr(req, "extra_key", None)
        for item, start, end in image_items(mm):
            key = item.hash
            if (end > kv_len or key in state.reused_keys or key in state.stored_keys
                    or self.has_image(key, namespace)):
                continue
            if state.approximate_from is not None and start > state.approximate_from:
                state.stored_keys.add(key)
                self.stats.second_generation_skipped += 1  # its KV saw approximate reused KV
                continue
            state.stored_keys.add(key)
            start_pos, grid = image_start_pos(mm, start), image_grid(item)
            if start_pos is None or grid is None:
                continue  # an item we cannot place again (counted by the planner's lookup)
            src = self.req_to_token_pool.req_to_token[req.req_pool_idx, start:end].to(torch.int64)
            entry = ImageEntry(key, start_pos, grid, end - start, namespace)
            stored = self.store_image(entry, src)
            logger.debug("vlcache: image %032x (%d tokens at %d) %s; store %d tokens", key, end - start,
                         entry.start_pos, "stored" if stored else "not stored", self.image_store_tokens)
            self.publish_stats()

    def reset(self) -> None:
        super().reset()
        self._image_nodes = {}
        if hasattr(self, "stats"):
            self.stats.store_tokens = self.stats.store_bytes = 0

    def _delete_leaf(self, node: TreeNode) -> None:
        super()._delete_leaf(node)
        entry: Optional[ImageEntry] = getattr(node, "vl_entry", None)
        if entry is not None and self._image_nodes.get((entry.namespace, entry.image_key)) is node:
            del self._image_nodes[(entry.namespace, entry.image_key)]
            self.stats.evicted_images += 1
            self._account(-entry.num_tokens)

    # ----- internals ---------------------------------------------------------------------------

    def _make_store_room(self, n: int) -> bool:
        """Evict unlocked image nodes until n more tokens fit the bound, in the order of the server's
        --radix-eviction-policy (LRU by default), as RadixCache.evict ranks tree leaves."""
        excess = self.stats.store_tokens + n - self.max_store_tokens
        if excess <= 0:
            return True
        victims = sorted((nd for nd in self._image_nodes.values() if nd.lock_ref == 0 and not nd.children),
                         key=self.eviction_strategy.get_priority)
        for node in victims:
            if excess <= 0:
                break
            excess -= len(node.value)
            self.token_to_kv_pool_allocator.free(node.value)
            self._delete_leaf(node)
            self._record_remove_event(node)  # as RadixCache.evict: KV-event subscribers see it go
        return excess <= 0

    def _alloc_slots(self, n: int) -> Optional[torch.Tensor]:
        allocator = self.token_to_kv_pool_allocator
        slots = allocator.alloc(n)
        if slots is None:
            self.evict(EvictParams(num_tokens=n))
            slots = allocator.alloc(n)
        return slots

    def copy_kv(self, src: torch.Tensor, dst: torch.Tensor, delta: int | torch.Tensor) -> None:
        """All layers: K/V of slots src to slots dst, K rotated by δ (the copy-rotate kernel)."""
        from vlcache_sglang.kernels import copy_rotate_pool_kv

        if self.inv_freq is None:
            raise RuntimeError("MultimodalRadixCache needs the model's rotary inv_freq to move KV")
        copy_rotate_pool_kv(self.token_to_kv_pool_allocator.get_kvcache(), src, dst, delta, self.inv_freq)

    def _account(self, tokens: int) -> None:
        self.stats.store_tokens += tokens
        self.stats.store_bytes = self.stats.store_tokens * self._bytes_per_token()

    def _bytes_per_token(self) -> int:
        allocator = self.token_to_kv_pool_allocator
        if allocator is None or not hasattr(allocator, "get_kvcache"):
            return 0
        pool = allocator.get_kvcache()
        k, v = pool.k_buffer, pool.v_buffer
        return sum(b[0].numel() * b.element_size() for b in (*k, *v))


def _pad_value(image_key: int) -> int:
    return 1_000_000 + image_key % (1 << 30)


def vlcache_tree_cache_factory(ctx: "TreeCacheBuildContext") -> RadixCache:
    """Factory behind `--radix-cache-backend vlcache` (set by --enable-vlcache)."""
    config: Optional[VLCacheConfig] = getattr(ctx.server_args, "vlcache", None)
    if config is None or not config.enabled:
        raise VLCacheSetupError(
            "--radix-cache-backend vlcache is set up by --enable-vlcache; pass that flag instead."
        )
    check_architecture(ctx.model_config.hf_config.architectures)
    allocator = ctx.params.token_to_kv_pool_allocator
    pool_tokens = allocator.size if allocator is not None else 0
    max_store = config.mm_store_tokens or max(pool_tokens // 4, 1)
    inv_freq = None
    if ctx.tp_worker is not None:
        from vlcache_sglang.model_patch.rope_params import inv_freq_of, language_rotary_embedding

        inv_freq = inv_freq_of(language_rotary_embedding(ctx.tp_worker.model_runner.model)).to(allocator.device)
    num_layers = ctx.model_config.num_hidden_layers
    cache = MultimodalRadixCache(ctx.params, config, max_store_tokens=max_store, num_layers=num_layers,
                                 inv_freq=inv_freq)
    if ctx.tp_worker is not None:
        from vlcache_sglang.plugin import install_scheduler

        install_scheduler(cache, ctx)  # every scheduler and model hook, verified: never half installed
    logger.info("vlcache tree cache: %s; image store bound %d tokens of %d", cache.policies.describe(), max_store,
                pool_tokens)
    if getattr(ctx.server_args, "enable_metrics", False):
        from vlcache_sglang.metrics import VLCacheMetrics, publishing_dp_rank

        dp_rank = publishing_dp_rank(ctx.tp_worker)
        if dp_rank is not None:
            cache.metrics = VLCacheMetrics(dp_rank)
    return cache
