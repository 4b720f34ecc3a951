"""VLCacheConfig from the CLI: every field has its flag, and each flag reaches its field."""

from __future__ import annotations

import argparse
from dataclasses import fields

from vlcache_sglang.config import VLCacheConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    VLCacheConfig.add_cli_args(parser)
    return parser


def test_every_field_has_its_flag():
    dests = {a.dest for a in _parser()._actions}
    missing = [f.name for f in fields(VLCacheConfig) if f.name != "enabled" and f"vlcache_{f.name}" not in dests]
    assert missing == [], f"fields without a --vlcache-<field> flag (from_cli_namespace reads them by name): {missing}"


def test_each_flag_reaches_its_field_and_absent_flags_keep_the_defaults():
    argv = ["--enable-vlcache", "--vlcache-policy", "cacheblend", "--vlcache-recompute-ratio", "0.2",
            "--vlcache-first-k", "7", "--vlcache-profile", "p.json", "--vlcache-check-layer", "2",
            "--vlcache-blend-score", "v", "--vlcache-error-bound", "0.3", "--vlcache-check-sample", "0.2",
            "--vlcache-mm-store-tokens", "900",
            "--vlcache-encoder-cache-mb", "5", "--vlcache-processed-cache-mb", "6", "--vlcache-compress-ratio", "0.1",
            "--vlcache-compress-budget", "uniform", "--vlcache-compress-recent-window", "3",
            "--vlcache-compress-sink-tokens", "4", "--vlcache-compress-max-layer-ratio", "0.5",
            "--vlcache-compress-uniform-share", "0.25"]
    config = VLCacheConfig.from_cli_namespace(_parser().parse_args(argv))
    assert config == VLCacheConfig(
        enabled=True, policy="cacheblend", recompute_ratio=0.2, first_k=7, profile="p.json", check_layer=2,
        blend_score="v", error_bound=0.3, check_sample=0.2, mm_store_tokens=900, encoder_cache_mb=5, processed_cache_mb=6,
        compress_ratio=0.1, compress_budget="uniform", compress_recent_window=3, compress_sink_tokens=4,
        compress_max_layer_ratio=0.5, compress_uniform_share=0.25)
    assert VLCacheConfig.from_cli_namespace(_parser().parse_args([])) == VLCacheConfig()
    assert VLCacheConfig.from_cli_namespace(argparse.Namespace()) == VLCacheConfig(), "a namespace without our flags"
