"""The `vlcache` radix-cache backend, selected by --enable-vlcache.

Foundation stage: the factory checks, inside every scheduler process, that the server was set up
for vlcache (flag given, Qwen2.5-VL loaded) and serves with SGLang's RadixCache, so ordinary
prefix hits stay zero-copy. Multimodal (non-prefix, image-keyed) nodes are added on top of this
class in the next stage; until then no image KV is reused across positions.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sglang.srt.mem_cache.radix_cache import RadixCache

from vlcache_sglang.setup_checks import VLCacheSetupError, check_architecture

if TYPE_CHECKING:
    from sglang.srt.mem_cache.registry import TreeCacheBuildContext

logger = logging.getLogger(__name__)


def vlcache_tree_cache_factory(ctx: "TreeCacheBuildContext") -> RadixCache:
    config = getattr(ctx.server_args, "vlcache", None)
    if config is None or not config.enabled:
        raise VLCacheSetupError(
            "--radix-cache-backend vlcache is set up by --enable-vlcache; pass that flag instead."
        )
    check_architecture(ctx.model_config.hf_config.architectures)
    logger.info("vlcache tree cache: policy=%s (multimodal nodes: not in this release)", config.policy)
    return RadixCache(ctx.params)
