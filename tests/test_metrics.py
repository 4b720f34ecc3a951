from prometheus_client import REGISTRY, generate_latest

from vlcache_sglang.metrics import VLCacheMetrics
from vlcache_sglang.stats import VLCacheStats


def test_stats_are_exported_as_gauges():
    metrics = VLCacheMetrics()
    stats = VLCacheStats(key_hits=3, key_misses=1, reused_tokens=100, recomputed_tokens=5, store_tokens=42,
                         reused_token_layers=2800, recomputed_token_layers=140)
    metrics.publish(stats)
    text = generate_latest(REGISTRY).decode()
    assert "sglang:vlcache_key_hits 3.0" in text
    assert "sglang:vlcache_hit_rate 0.75" in text
    assert "sglang:vlcache_recomputed_fraction 0.05" in text
    assert "sglang:vlcache_store_tokens 42.0" in text
