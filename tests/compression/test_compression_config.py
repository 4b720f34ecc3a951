"""CompressionConfig: off by default, validated, per-request overrides."""

from __future__ import annotations

import pytest

from vlcache_sglang.compression.config import CompressionConfig


def test_off_by_default():
    assert not CompressionConfig().enabled
    assert CompressionConfig(compress_ratio=0.1).enabled


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.01, float("nan"), float("inf"), "0.1", True])
def test_ratio_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="compress_ratio"):
        CompressionConfig(compress_ratio=bad)


@pytest.mark.parametrize("field, bad, match", [("budget", "h2o", "unknown"), ("recent_window", -1, "recent_window"),
                                               ("sink_tokens", -1, "sink_tokens"),
                                               ("sparsity_threshold", 1.0, "sparsity_threshold"),
                                               ("fallback_queries", 0, "fallback_queries"),
                                               ("max_queries", 0, "max_queries"),
                                               ("max_budget", 0.0, "max_budget"), ("max_budget", 1.5, "max_budget"),
                                               ("uniform_share", -0.1, "uniform_share"),
                                               ("uniform_share", 1.5, "uniform_share")])
def test_other_fields_are_validated(field, bad, match):
    with pytest.raises(ValueError, match=match):
        CompressionConfig(**{field: bad})


def test_overrides():
    base = CompressionConfig(compress_ratio=0.1)
    assert base.with_overrides(compress_ratio=0.5).compress_ratio == 0.5
    assert base.with_overrides(budget="uniform").compress_ratio == 0.1
    with pytest.raises(ValueError, match="unknown compression option"):
        base.with_overrides(ratio=0.5)
    with pytest.raises(ValueError, match="compress_ratio"):
        base.with_overrides(compress_ratio=2.0)


def test_server_flags_enter_through_the_plugin_config_and_name_the_flag():
    from vlcache_sglang.config import VLCacheConfig

    config = VLCacheConfig(enabled=True, compress_ratio=0.2, compress_budget="uniform", compress_recent_window=8,
                           compress_max_layer_ratio=0.3, compress_sink_tokens=4, compress_uniform_share=0.5)
    assert config.compression == CompressionConfig(compress_ratio=0.2, budget="uniform", recent_window=8,
                                                   max_budget=0.3, sink_tokens=4, uniform_share=0.5)
    assert not VLCacheConfig(enabled=True).compression.enabled  # off by default
    for field, bad, flag in (("compress_ratio", 1.5, "--vlcache-compress-ratio"),
                             ("compress_budget", "h2o", "--vlcache-compress-budget"),
                             ("compress_recent_window", -1, "--vlcache-compress-recent-window"),
                             ("compress_sink_tokens", -1, "--vlcache-compress-sink-tokens"),
                             ("compress_max_layer_ratio", 2.0, "--vlcache-compress-max-layer-ratio"),
                             ("compress_uniform_share", 2.0, "--vlcache-compress-uniform-share")):
        with pytest.raises(ValueError, match=flag):
            VLCacheConfig(enabled=True, **{field: bad})
