"""VLCacheConfig: every option this project adds to SGLang, validated once at start-up.

Config enters here (from the server's CLI namespace) and nowhere else: hot code reads this
dataclass, never os.environ.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from typing import Optional

from vlcache_sglang.compression.config import BUDGET_METHODS, CompressionConfig
from vlcache_sglang.recompute_policy import PolicyParams, registered_recompute_policies

# Attention backends whose extend path the selective prefill is written against.
SUPPORTED_ATTENTION_BACKENDS = ("flashinfer", "triton")
# Decode backends that can attend per-layer kept sets (compression): SGLang's Triton decode kernel
# takes kv_indptr / kv_indices per call; FlashInfer would need one planned wrapper per layer.
COMPRESSION_DECODE_BACKENDS = ("triton",)
SUPPORTED_ARCHITECTURES = ("Qwen2_5_VLForConditionalGeneration",)
RADIX_CACHE_BACKEND_NAME = "vlcache"


# CompressionConfig's field -> the VLCacheConfig field (and so the --vlcache-<field> flag) that sets it.
_COMPRESSION_FIELDS = {"compress_ratio": "compress_ratio", "budget": "compress_budget",
                       "recent_window": "compress_recent_window", "sink_tokens": "compress_sink_tokens",
                       "max_budget": "compress_max_layer_ratio", "uniform_share": "compress_uniform_share"}


@dataclass(frozen=True)
class VLCacheConfig:
    enabled: bool = False
    # The default keeps answers right: on the trained tiny models every policy at <= 20 % recompute lost
    # most of what reuse loses, image_bounded at tau 0.1 matched full on every regime while error_bounded
    # lost 5-25 points (README "Recompute policies"). Its check is a probe over a tenth of each image
    # (ImageBounded.default_check_sample): where no image exceeds tau it costs the floor and that sample.
    policy: str = "image_bounded"
    recompute_ratio: float = 0.05
    first_k: int = 32
    profile: Optional[str] = None  # vlcache: layer-sensitivity profile file (python -m vlcache_sglang.calibrate)
    # vlcache with a profile: its ratios as a step function of at most this many values (0: exact).
    # Each change of the set costs the eager loop a gather and an attention plan (layer_profile.step_ratios).
    profile_levels: int = 4
    check_layer: int = 1  # cacheblend / error_bounded / image_bounded
    blend_score: str = "k"  # cacheblend: rank by K ("k", LMCache) or V ("v", the authors' code) deviation
    error_bound: float = 0.1  # error/image_bounded: largest relative K/V error at the check layer served from cache
    # error/image_bounded: share of each reused image the check measures (1: all; below, a probe pass
    # over a strided sample replans the request: the check costs that share, not every token up to c).
    # None: each policy's own (recompute_policy.default_check_sample: image_bounded 0.1, the others 1).
    check_sample: Optional[float] = None
    # KV tokens that multimodal nodes may hold; None = a quarter of the KV pool.
    mm_store_tokens: Optional[int] = None
    encoder_cache_mb: int = 2048
    processed_cache_mb: int = 1024
    # VL-Cache KV compression after prefill (compression/): alpha, the share of prompt KV kept;
    # None = off (the default). The budget method and recent window go with it.
    compress_ratio: Optional[float] = None
    compress_budget: str = "vlcache"
    compress_recent_window: int = 0
    compress_sink_tokens: int = 0
    compress_max_layer_ratio: float = 1.0  # beta_max: no layer keeps more (1.0: the paper's budget)
    compress_uniform_share: float = 0.0  # s: the uniform part of every layer's budget (0: the paper's)
    # Accept --tp-size / --dp-size > 1: built for them (README "Tensor parallelism"), never run on GPUs.
    experimental_parallel: bool = False

    def __post_init__(self) -> None:
        policies = registered_recompute_policies()
        if self.policy not in policies:
            raise ValueError(f"--vlcache-policy={self.policy!r} is unknown; choose one of {policies}")
        try:  # the policy's own checks, one place; the message names the flag
            PolicyParams(recompute_ratio=self.recompute_ratio, first_k=self.first_k, check_layer=self.check_layer,
                         blend_score=self.blend_score, error_bound=self.error_bound,
                         check_sample=1.0 if self.check_sample is None else self.check_sample)
        except ValueError as exc:
            field = str(exc).split()[0]
            raise ValueError(f"--vlcache-{field.replace('_', '-')}: {exc}") from exc
        if self.profile_levels < 0:
            raise ValueError(f"--vlcache-profile-levels must be >= 0 (0: the profile's ratios exactly), "
                             f"got {self.profile_levels}")
        if self.mm_store_tokens is not None and self.mm_store_tokens <= 0:
            raise ValueError(
                f"--vlcache-mm-store-tokens must be > 0 (omit it for a quarter of the KV pool), "
                f"got {self.mm_store_tokens}"
            )
        if self.encoder_cache_mb < 0:
            raise ValueError(f"--vlcache-encoder-cache-mb must be >= 0, got {self.encoder_cache_mb}")
        if self.processed_cache_mb < 0:
            raise ValueError(f"--vlcache-processed-cache-mb must be >= 0, got {self.processed_cache_mb}")
        try:  # CompressionConfig's own checks, one place; the message names the flag
            self.compression
        except ValueError as exc:
            first = str(exc).split()[0]  # the checks name their field first
            field = _COMPRESSION_FIELDS.get(first, first)
            raise ValueError(f"--vlcache-{field.replace('_', '-')}: {exc}") from exc

    @property
    def compression(self) -> CompressionConfig:
        """The server's compression options (off unless --vlcache-compress-ratio is given)."""
        return CompressionConfig(**{theirs: getattr(self, ours) for theirs, ours in _COMPRESSION_FIELDS.items()})

    @staticmethod
    def add_cli_args(parser: argparse.ArgumentParser) -> None:
        group = parser.add_argument_group("vlcache (position-independent image KV reuse)")
        group.add_argument(
            "--enable-vlcache",
            action="store_true",
            help="Reuse a recurring image's encoder output and KV at any position (Qwen2.5-VL; "
            "--attention-backend flashinfer or triton). Off: SGLang runs exactly as stock.",
        )
        group.add_argument(
            "--vlcache-policy",
            default=VLCacheConfig.policy,
            choices=registered_recompute_policies(),
            help="Which reused image tokens each layer recomputes.",
        )
        group.add_argument(
            "--vlcache-recompute-ratio",
            type=float,
            default=VLCacheConfig.recompute_ratio,
            help="Fraction of reused image tokens a ratio-based policy recomputes (0..1): vlcache's mean "
            "per-layer ratio, cacheblend's kept share, error_bounded's floor.",
        )
        group.add_argument(
            "--vlcache-first-k",
            type=int,
            default=VLCacheConfig.first_k,
            help="Tokens at the start of each reused image that policy first_k recomputes.",
        )
        group.add_argument(
            "--vlcache-profile",
            default=None,
            metavar="FILE",
            help="Layer-sensitivity profile of this model for policy vlcache (written by "
            "`python -m vlcache_sglang.calibrate`); without it every layer recomputes the same ratio.",
        )
        group.add_argument(
            "--vlcache-profile-levels",
            type=int,
            default=VLCacheConfig.profile_levels,
            help="With --vlcache-profile: the per-layer ratios as a step function of at most this many "
            "values, each run of layers at its mean (same compute; fewer set changes for the eager loop). "
            "0: the profile's ratios exactly.",
        )
        group.add_argument(
            "--vlcache-check-layer",
            type=int,
            default=VLCacheConfig.check_layer,
            help="cacheblend / error_bounded / image_bounded: layers before it compute every reused token (a probe: "
            "its sample, --vlcache-check-sample); at it the fresh and cached K/V are compared (>= 1).",
        )
        group.add_argument(
            "--vlcache-blend-score",
            default=VLCacheConfig.blend_score,
            choices=("k", "v"),
            help="cacheblend: rank reused tokens by the deviation of K (LMCache) or V (the authors' code).",
        )
        group.add_argument(
            "--vlcache-error-bound",
            type=float,
            default=VLCacheConfig.error_bound,
            help="error_bounded / image_bounded: a reused token keeps its cached KV past the check layer only "
            "if its K and V there are within this relative L2 error of the fresh ones (image_bounded: and its "
            "image's as a whole); the rest is recomputed.",
        )
        group.add_argument(
            "--vlcache-check-sample",
            type=float,
            default=VLCacheConfig.check_sample,
            help="error_bounded / image_bounded: share (0..1] of each reused image that the layers up to the "
            "check layer compute and the check measures (a strided sample plus the floor). Below 1 the check "
            "is a probe: its decision replans the request and the prefill starts over from layer 0, so the "
            "check costs about this share of the first layers; the image's error is estimated from the sample "
            "and the token bound holds for the sampled tokens. 1: every reused token is measured, the check "
            "costs layers 0..C over all of them. Default: the policy's own, 0.1 for image_bounded (the "
            "server's default policy), 1 for error_bounded (its bound is per token). Given, it applies to "
            "every request's check, a request that switches policy included.",
        )
        group.add_argument(
            "--vlcache-mm-store-tokens",
            type=int,
            default=None,
            help="Most KV tokens the multimodal image store may hold (default: a quarter of the KV pool).",
        )
        group.add_argument(
            "--vlcache-encoder-cache-mb",
            type=int,
            default=VLCacheConfig.encoder_cache_mb,
            help="Size of SGLang's vision-encoder output cache (keyed by image key) in MiB.",
        )
        group.add_argument(
            "--vlcache-processed-cache-mb",
            type=int,
            default=VLCacheConfig.processed_cache_mb,
            help="Tokenizer-side cache of processed pixels by raw-bytes image key, in MiB: a hit skips "
            "decode, resize, normalisation and pixel hashing.",
        )
        group.add_argument(
            "--vlcache-compress-ratio",
            type=float,
            default=None,
            metavar="ALPHA",
            help="VL-Cache KV compression after prefill: keep this share (0..1] of each request's prompt KV "
            "for decode (per-layer budgets from the post-vision attention). Off by default; 1.0 keeps "
            "everything. Needs --attention-backend triton (or --decode-attention-backend triton) and "
            "--disable-overlap-schedule; --triton-attention-num-kv-splits 64 advised.",
        )
        group.add_argument(
            "--vlcache-compress-budget",
            default=VLCacheConfig.compress_budget,
            choices=BUDGET_METHODS,
            help="Compression: per-layer budgets from each layer's attention sparsity (vlcache) or the same "
            "share at every layer (uniform, the H2O-like baseline).",
        )
        group.add_argument(
            "--vlcache-compress-recent-window",
            type=int,
            default=VLCacheConfig.compress_recent_window,
            help="Compression: the last prompt tokens every layer keeps besides the post-vision queries.",
        )
        group.add_argument(
            "--vlcache-compress-sink-tokens",
            type=int,
            default=VLCacheConfig.compress_sink_tokens,
            help="Compression: the first prompt tokens every layer keeps (attention sinks; 0, the default, "
            "is VL-Cache's own rule).",
        )
        group.add_argument(
            "--vlcache-compress-max-layer-ratio",
            type=float,
            default=VLCacheConfig.compress_max_layer_ratio,
            metavar="BETA_MAX",
            help="Compression: no layer keeps more than this share of a request's prompt KV (the excess goes "
            "to the other layers), so at least 1 - BETA_MAX of it returns to the pool; 1.0 (the default) "
            "is VL-Cache's own budget, where one dense layer can keep everything and free nothing.",
        )
        group.add_argument(
            "--vlcache-compress-uniform-share",
            type=float,
            default=VLCacheConfig.compress_uniform_share,
            metavar="S",
            help="Compression (budget vlcache): every layer keeps S x ALPHA whatever its sparsity, and the rest "
            "of the mean ALPHA follows the sparsity-aware budgets; 0 (the default) is VL-Cache's own budget, 1 "
            "is uniform. Sparse layers starved by the paper's budget lost answers on the tiny present tasks.",
        )
        group.add_argument(
            "--vlcache-experimental-parallel",
            action="store_true",
            help="Accept --tp-size > 1 and --dp-size > 1. Built and CPU-tested for them (each rank its own "
            "image store over its KV heads, observing policies' scores summed over the TP group), not yet run "
            "on several GPUs; decoder CUDA graphs stay off under TP, and compression is refused with TP.",
        )

    @classmethod
    def from_cli_namespace(cls, ns: argparse.Namespace) -> "VLCacheConfig":
        """Every field from its flag: `--enable-vlcache`, and `--vlcache-<field>` for the rest (a
        namespace without the flag, e.g. SGLang's own tests, keeps the field's default)."""
        values = {f.name: getattr(ns, f"vlcache_{f.name}", f.default) for f in fields(cls) if f.name != "enabled"}
        return cls(enabled=bool(getattr(ns, "enable_vlcache", False)), **values)
