"""Per-server vlcache counters: what was reused, recomputed, stored and evicted."""

from __future__ import annotations

import dataclasses
import logging
import time

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VLCacheStats:
    key_hits: int = 0  # images found in the store with matching grid and token count
    key_misses: int = 0  # images not in the store (computed, then stored)
    key_mismatches: int = 0  # key found, grid or token count differs: treated as a miss
    reused_tokens: int = 0  # image tokens whose KV came from the store
    recomputed_tokens: int = 0  # of those, tokens the policy recomputed at layer 0 (not cached_tokens)
    # Per layer: Σ_l reused tokens, and Σ_l reused tokens whose QKV layer l computed (a check layer
    # computes QKV for every reused token it scores). recomputed_fraction is their ratio: VLCache's r
    # averaged over layers, the paper's "2-5 %".
    reused_token_layers: int = 0
    recomputed_token_layers: int = 0
    stored_images: int = 0
    store_skipped: int = 0  # images not stored: no room even after eviction
    second_generation_skipped: int = 0  # images not stored: computed after an approximately reused image
    evicted_images: int = 0
    store_tokens: int = 0  # KV tokens held by image nodes now
    store_bytes: int = 0  # KV bytes held by image nodes now
    # VL-Cache compression (--vlcache-compress-ratio): requests trimmed after prefill, the KV slots the
    # trims gave back at once, and requests due for compression served uncompressed (queries not captured).
    compressed_requests: int = 0
    compress_freed_slots: int = 0
    compress_not_captured: int = 0
    # Of the trimmed requests: Σ_l prompt tokens layer l keeps, over Σ_l prompt tokens (L·m each). Their
    # ratio is the kept share actually served, which exceeds α where the always-kept voters and window
    # outweigh α·m (short prompts).
    compress_kept_token_layers: int = 0
    compress_prompt_token_layers: int = 0
    # Decode steps run eagerly because the per-layer graph buffers could not hold the batch.
    compress_graph_fallbacks: int = 0

    _last_log: float = dataclasses.field(default=0.0, repr=False)

    @property
    def hit_rate(self) -> float:
        total = self.key_hits + self.key_misses + self.key_mismatches
        return self.key_hits / total if total else 0.0

    @property
    def recomputed_fraction(self) -> float:
        total = self.reused_token_layers
        return self.recomputed_token_layers / total if total else 0.0

    @property
    def compress_kept_fraction(self) -> float:
        total = self.compress_prompt_token_layers
        return self.compress_kept_token_layers / total if total else 0.0

    def as_dict(self) -> dict[str, float]:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        d.update(hit_rate=round(self.hit_rate, 4), recomputed_fraction=round(self.recomputed_fraction, 4),
                 compress_kept_fraction=round(self.compress_kept_fraction, 4))
        return d

    def maybe_log(self, every_s: float = 30.0) -> None:
        now = time.monotonic()
        if now - self._last_log >= every_s:
            self._last_log = now
            logger.info("vlcache stats: %s", self.as_dict())
