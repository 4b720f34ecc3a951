"""Per-request policy overrides (custom_params.vlcache) and the server's policy with its profile (CPU)."""

import json
from types import SimpleNamespace

import pytest

from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.request_policy import (OverrideCheck, PolicyOverride, PolicyResolver, parse_override,
                                           validate_override)


def test_overrides_parse_to_typed_values():
    assert parse_override(None) is None and parse_override({"other": 1}) is None
    got = parse_override({"vlcache": {"policy": "cacheblend", "recompute_ratio": 0.1, "first_k": 8.0}})
    assert got == PolicyOverride(policy="cacheblend", recompute_ratio=0.1, first_k=8)


@pytest.mark.parametrize("raw, match", [
    ("full", "must be an object"),
    ({"policy": "cache_blend"}, "unknown; choose one of"),
    ({"ratio": 0.1}, "unknown keys"),
    ({"recompute_ratio": 1.5}, r"\[0, 1\]"),
    ({"recompute_ratio": "0.1"}, "must be a float"),
    ({"first_k": 2.5}, "must be a int"),
    ({"first_k": True}, "must be a int"),
    ({"error_bound": -1}, ">= 0"),
    ({"check_sample": 0}, r"check_sample must lie in \(0, 1\]"),
    ({"check_sample": 1.5}, r"check_sample must lie in \(0, 1\]"),
    ({"compress_ratio": 0}, r"compress_ratio must lie in \(0, 1\]"),
    ({"compress_ratio": 1.5}, r"compress_ratio must lie in \(0, 1\]"),
    ({"compress_ratio": "0.1"}, "must be a float"),
    ({"compress_ratio": None}, "must be a float"),
])
def test_bad_overrides_are_value_errors_with_the_fix(raw, match):
    with pytest.raises(ValueError, match=match):
        parse_override({"vlcache": raw})
    with pytest.raises(ValueError, match=match):  # the tokenizer-side hook: SGLang turns it into a 400
        validate_override(None, SimpleNamespace(custom_params={"vlcache": raw}), 151000)


def test_resolver_builds_each_override_once_and_the_default_otherwise():
    resolver = PolicyResolver(VLCacheConfig(enabled=True, policy="vlcache", recompute_ratio=0.05), num_layers=4)
    plain = SimpleNamespace(rid="a", sampling_params=SimpleNamespace(custom_params=None))
    asks = SimpleNamespace(rid="b", sampling_params=SimpleNamespace(custom_params={"vlcache": {"recompute_ratio": 0.2}}))
    assert resolver.for_request(plain) is resolver.default
    policy = resolver.for_request(asks)
    assert policy.name == "vlcache" and policy.params.recompute_ratio == 0.2
    assert resolver.for_request(asks) is policy
    assert "no profile: uniform" in resolver.describe()
    probe = resolver.for_request(_req({"vlcache": {"policy": "image_bounded", "check_sample": 0.1}}))
    assert probe.probes and probe.params.check_sample == 0.1 and not resolver.default.probes
    server = PolicyResolver(VLCacheConfig(enabled=True, check_sample=0.5), num_layers=4).default
    assert server.name == "image_bounded" and server.probes, "--vlcache-check-sample reaches the server's policy"


def test_the_start_up_line_states_the_default_bound_and_how_it_is_checked():
    default = PolicyResolver(VLCacheConfig(enabled=True), num_layers=4)
    assert default.default.probes, "the server's default check is a probe (README: Recompute policies)"
    assert default.describe().endswith("; check at layer 1, tau 0.1, probe over a 0.1 sample")
    plain = PolicyResolver(VLCacheConfig(enabled=True, check_sample=1.0, error_bound=0.2), num_layers=4)
    assert plain.describe().endswith("; check at layer 1, tau 0.2, every reused token")
    blend = PolicyResolver(VLCacheConfig(enabled=True, policy="cacheblend"), num_layers=4).describe()
    assert blend.endswith("; check at layer 1, every reused token") and "tau" not in blend
    static = PolicyResolver(VLCacheConfig(enabled=True, policy="first_k"), num_layers=4).describe()
    assert "check" not in static


def test_each_policy_has_its_own_check_sample_unless_the_server_or_the_request_sets_one():
    def sample(config, custom=None):
        resolver = PolicyResolver(config, num_layers=4)
        policy = resolver.default if custom is None else resolver.for_request(_req({"vlcache": custom}))
        return policy.name, policy.params.check_sample

    image, error = VLCacheConfig(enabled=True), VLCacheConfig(enabled=True, policy="error_bounded")
    assert sample(image) == ("image_bounded", 0.1), "the default policy probes"
    assert sample(error) == ("error_bounded", 1.0), "a per-token bound measures every token"
    assert sample(image, {"policy": "error_bounded"}) == ("error_bounded", 1.0)
    assert sample(error, {"policy": "image_bounded"}) == ("image_bounded", 0.1)
    assert sample(image, {"check_sample": 0.5}) == ("image_bounded", 0.5)
    set_by_server = VLCacheConfig(enabled=True, check_sample=0.25)
    assert sample(set_by_server, {"policy": "error_bounded"}) == ("error_bounded", 0.25)
    assert sample(set_by_server, {"check_sample": 1}) == ("image_bounded", 1.0)


def test_a_profile_of_another_model_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"format": "vlcache-layer-profile", "version": 1, "metric": "first_token_kl",
                                "model": "x", "samples": 3, "num_hidden_layers": 3, "sensitivity": [0.0, 1.0, 0.5]}))
    with pytest.raises(ValueError, match="rerun `python -m vlcache_sglang.calibrate`"):
        PolicyResolver(VLCacheConfig(enabled=True, policy="vlcache", profile=str(path)), num_layers=4)
    resolver = PolicyResolver(VLCacheConfig(enabled=True, policy="vlcache", profile=str(path)), num_layers=3)
    ratios = resolver.default.params.layer_ratios
    assert len(ratios) == 3 and abs(sum(ratios) / 3 - 0.05) < 1e-9
    # --vlcache-profile-levels: the ratios as a step function of that many values, same mean
    stepped = PolicyResolver(VLCacheConfig(enabled=True, policy="vlcache", profile=str(path), profile_levels=1),
                             num_layers=3).default.params.layer_ratios
    assert stepped == pytest.approx((0.05, 0.05, 0.05)) and len(set(ratios)) > 1


def _req(custom):
    return SimpleNamespace(rid="r", sampling_params=SimpleNamespace(custom_params=custom))


def test_compress_ratio_override_replaces_the_servers_alpha_and_leaves_the_policy_alone():
    assert parse_override({"vlcache": {"compress_ratio": 1}}) == PolicyOverride(compress_ratio=1.0)
    resolver = PolicyResolver(VLCacheConfig(enabled=True, policy="none", compress_ratio=0.1,
                                            compress_budget="uniform"), num_layers=4)
    asks = _req({"vlcache": {"compress_ratio": 0.5}})
    assert resolver.for_request(asks) is resolver.default  # not a recompute-policy override
    assert resolver.compression_for(asks).compress_ratio == 0.5
    assert resolver.compression_for(asks).budget == "uniform"  # the server's other options stay
    assert resolver.compression_for(_req(None)).compress_ratio == 0.1
    both = _req({"vlcache": {"compress_ratio": 1.0, "policy": "full"}})
    assert resolver.for_request(both).name == "full" and resolver.compression_for(both).compress_ratio == 1.0


def test_a_server_without_compression_serves_requests_uncompressed_and_refuses_the_override():
    resolver = PolicyResolver(VLCacheConfig(enabled=True), num_layers=4)
    assert not resolver.compression_for(_req({"vlcache": {"compress_ratio": 0.5}})).enabled
    params = SimpleNamespace(custom_params={"vlcache": {"compress_ratio": 0.5}})
    with pytest.raises(ValueError, match="--vlcache-compress-ratio"):
        OverrideCheck(server_compresses=False).after_verify(None, params)
    assert OverrideCheck(server_compresses=True).after_verify("ok", params) == "ok"
    with pytest.raises(ValueError, match="unknown keys"):  # the generic checks still run
        OverrideCheck(server_compresses=True).after_verify(None, SimpleNamespace(custom_params={"vlcache": {"x": 1}}))
