"""Which recompute policy a request runs under: the server's, or the request's own override.

A request may override the server's policy and its parameters in its body, through SGLang's
`custom_params` (OpenAI chat / completions: top-level `custom_params`; /generate:
`sampling_params.custom_params`):

    "custom_params": {"vlcache": {"policy": "cacheblend", "recompute_ratio": 0.1}}

Keys: `policy`, `recompute_ratio`, `first_k`, `error_bound`, `check_sample` (any subset; the rest are the server's),
and `compress_ratio` (alpha of VL-Cache compression for this request; 1.0 serves it uncompressed;
only on a server started with --vlcache-compress-ratio, whose set-up decode over kept sets needs).
`validate_override` runs on the tokenizer side inside SGLang's `SamplingParams.verify`, so a bad
value is a 400 before the request is queued; the scheduler parses the same dict again with the same
function (it arrives as plain JSON values).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Optional

from vlcache_sglang.compression.config import CompressionConfig
from vlcache_sglang.config import VLCacheConfig
from vlcache_sglang.layer_profile import LayerProfile, layer_ratios, load_layer_profile, step_ratios
from vlcache_sglang.recompute_policy import (
    ErrorBounded,
    PolicyParams,
    RecomputePolicy,
    default_check_sample,
    get_recompute_policy,
    registered_recompute_policies,
)

logger = logging.getLogger(__name__)

OVERRIDE_KEY = "vlcache"
_NUMERIC = {"recompute_ratio": float, "first_k": int, "error_bound": float, "check_sample": float,
            "compress_ratio": float}
_POLICY_NUMERIC = ("recompute_ratio", "first_k", "error_bound", "check_sample")  # PolicyParams' fields


@dataclasses.dataclass(frozen=True)
class PolicyOverride:
    policy: Optional[str] = None
    recompute_ratio: Optional[float] = None
    first_k: Optional[int] = None
    error_bound: Optional[float] = None
    check_sample: Optional[float] = None
    compress_ratio: Optional[float] = None  # alpha of this request's compression


def parse_override(custom_params: Any) -> Optional[PolicyOverride]:
    """The request's override, None when it has none; ValueError (-> HTTP 400) when malformed."""
    if not isinstance(custom_params, dict) or OVERRIDE_KEY not in custom_params:
        return None
    raw = custom_params[OVERRIDE_KEY]
    if not isinstance(raw, dict):
        raise ValueError(f'custom_params.{OVERRIDE_KEY} must be an object like {{"policy": "full"}}, got {raw!r}')
    unknown = sorted(set(raw) - {"policy", *_NUMERIC})
    if unknown:
        raise ValueError(f"custom_params.{OVERRIDE_KEY}: unknown keys {unknown}; allowed: policy, {', '.join(_NUMERIC)}")
    values: dict[str, Any] = {}
    if "policy" in raw:
        if raw["policy"] not in registered_recompute_policies():
            raise ValueError(f"custom_params.{OVERRIDE_KEY}.policy={raw['policy']!r} is unknown; "
                             f"choose one of {registered_recompute_policies()}")
        values["policy"] = raw["policy"]
    for key, kind in _NUMERIC.items():
        if key not in raw:
            continue
        v = raw[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not float(v).is_integer()):
            raise ValueError(f"custom_params.{OVERRIDE_KEY}.{key} must be a {kind.__name__}, got {v!r}")
        values[key] = kind(v)
    override = PolicyOverride(**values)
    # The ranges are PolicyParams' and CompressionConfig's own checks: the message is the start-up one.
    PolicyParams(**{k: getattr(override, k) for k in _POLICY_NUMERIC if getattr(override, k) is not None})
    if override.compress_ratio is not None:
        try:
            CompressionConfig(compress_ratio=override.compress_ratio)
        except ValueError as exc:
            raise ValueError(f"custom_params.{OVERRIDE_KEY}.{exc}") from exc
    return override


def validate_override(result: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
    """AFTER hook on SamplingParams.verify (tokenizer side): reject a malformed override with a 400."""
    parse_override(getattr(sampling_params, "custom_params", None))
    return result


class OverrideCheck:
    """`validate_override` plus what this server can serve: a per-request compress_ratio needs a
    server started with --vlcache-compress-ratio (its start-up checks cover decode over kept sets)."""

    def __init__(self, server_compresses: bool) -> None:
        self.server_compresses = server_compresses

    def after_verify(self, result: Any, sampling_params: Any, *args: Any, **kwargs: Any) -> Any:
        override = parse_override(getattr(sampling_params, "custom_params", None))
        if override is not None and override.compress_ratio is not None and not self.server_compresses:
            raise ValueError(f"custom_params.{OVERRIDE_KEY}.compress_ratio needs a server started with "
                             "--vlcache-compress-ratio (e.g. 1.0 to compress only the requests that ask)")
        return result


class PolicyResolver:
    """The server's policy, and one policy object per distinct override (cached: requests of one
    workload ask for the same few)."""

    def __init__(self, config: VLCacheConfig, num_layers: int) -> None:
        self._config = config
        self._num_layers = num_layers
        if config.check_layer >= num_layers:
            raise ValueError(f"--vlcache-check-layer {config.check_layer} must be below the model's {num_layers} "
                             "layers (cacheblend / error_bounded compare K/V there)")
        self._profile = self._load_profile(config.profile, num_layers)
        self._policies: dict[PolicyOverride, RecomputePolicy] = {}
        self.default = self._build(PolicyOverride())

    def for_request(self, req: Any) -> RecomputePolicy:
        custom = getattr(getattr(req, "sampling_params", None), "custom_params", None)
        try:
            override = parse_override(custom)
        except ValueError:  # verified on the tokenizer side; a request that slipped past runs as the server's
            logger.warning("vlcache: request %s has a malformed override; using the server's policy", req.rid)
            override = None
        if override is not None:  # compression is not a recompute policy's business
            override = dataclasses.replace(override, compress_ratio=None)
        if override is None or override == PolicyOverride():
            return self.default
        policy = self._policies.get(override)
        if policy is None:
            policy = self._policies[override] = self._build(override)
        return policy

    def compression_for(self, req: Any) -> CompressionConfig:
        """The request's compression options: the server's, alpha replaced by its override's."""
        custom = getattr(getattr(req, "sampling_params", None), "custom_params", None)
        try:
            override = parse_override(custom)
        except ValueError:  # verified on the tokenizer side, as in for_request
            override = None
        base = self._config.compression
        if override is None or override.compress_ratio is None or not base.enabled:
            return base
        return base.with_overrides(compress_ratio=override.compress_ratio)

    def describe(self) -> str:
        ratios = self.default.params.layer_ratios
        source = (f"profile {self._config.profile} ({self._profile.metric}, {self._profile.samples} samples)"
                  if self._config.profile else "no profile: uniform layer ratios")
        shown = "" if ratios is None else f", r_l {min(ratios):.3f}..{max(ratios):.3f}"
        return f"policy {self.default.name}, ratio {self._config.recompute_ratio}, {source}{shown}{self._check()}"

    def _check(self) -> str:
        """The bound an observing default keeps and how its check measures it (empty for static plans)."""
        policy = self.default
        if not policy.observes(self._num_layers):
            return ""
        p = policy.params
        bound = f", tau {p.error_bound}" if isinstance(policy, ErrorBounded) else ""
        sample = f", probe over a {p.check_sample:g} sample" if policy.probes else ", every reused token"
        return f"; check at layer {p.check_layer}{bound}{sample}"

    def _build(self, override: PolicyOverride) -> RecomputePolicy:
        c = self._config
        name = override.policy or c.policy
        ratio = c.recompute_ratio if override.recompute_ratio is None else override.recompute_ratio
        params = PolicyParams(
            recompute_ratio=ratio,
            first_k=c.first_k if override.first_k is None else override.first_k,
            layer_ratios=step_ratios(layer_ratios(self._profile, ratio), c.profile_levels) if c.profile else None,
            check_layer=c.check_layer,
            blend_score=c.blend_score,
            error_bound=c.error_bound if override.error_bound is None else override.error_bound,
            check_sample=_check_sample(name, override, c),
        )
        return get_recompute_policy(name, params)

    @staticmethod
    def _load_profile(path: Optional[str], num_layers: int) -> LayerProfile:
        if path is None:
            return LayerProfile.uniform(num_layers)
        profile = load_layer_profile(path)
        if profile.num_layers != num_layers:
            raise ValueError(
                f"--vlcache-profile {path} has {profile.num_layers} layers, the model has {num_layers}: "
                "rerun `python -m vlcache_sglang.calibrate` for this model"
            )
        return profile


def _check_sample(policy: str, override: PolicyOverride, config: VLCacheConfig) -> float:
    """The request's, else the server's, else the policy's own check sample (a request that switches
    to error_bounded on an image_bounded server gets a plain check unless someone asked otherwise)."""
    for value in (override.check_sample, config.check_sample):
        if value is not None:
            return value
    return default_check_sample(policy)
