from types import SimpleNamespace

from prometheus_client import REGISTRY, generate_latest

from vlcache_sglang.metrics import VLCacheMetrics, publishing_dp_rank
from vlcache_sglang.stats import VLCacheStats


def test_stats_are_exported_as_gauges_labelled_by_dp_rank():
    metrics = VLCacheMetrics(dp_rank=1)
    stats = VLCacheStats(key_hits=3, key_misses=1, reused_tokens=100, recomputed_tokens=5, store_tokens=42,
                         reused_token_layers=2800, recomputed_token_layers=140)
    metrics.publish(stats)
    text = generate_latest(REGISTRY).decode()
    assert 'sglang:vlcache_key_hits{dp_rank="1"} 3.0' in text
    assert 'sglang:vlcache_hit_rate{dp_rank="1"} 0.75' in text
    assert 'sglang:vlcache_recomputed_fraction{dp_rank="1"} 0.05' in text
    assert 'sglang:vlcache_store_tokens{dp_rank="1"} 42.0' in text


def ps(**ranks):
    return SimpleNamespace(ps=SimpleNamespace(**{"pp_rank": 0, "attn_tp_rank": 0, "dp_rank": None, **ranks}))


def test_one_scheduler_per_dp_rank_publishes():
    assert publishing_dp_rank(None) == 0, "one GPU, no parallel state"
    assert publishing_dp_rank(ps()) == 0
    assert publishing_dp_rank(ps(dp_rank=1)) == 1
    assert publishing_dp_rank(ps(attn_tp_rank=1)) is None, "TP rank 1 holds the same counts as rank 0"
    assert publishing_dp_rank(ps(pp_rank=1)) is None
