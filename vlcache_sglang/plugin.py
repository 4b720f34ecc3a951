"""SGLang plugin entry point (`sglang.srt.plugins` group): flags, start-up checks, cache backend, and
the one composition root that installs and verifies every hook.

SGLang calls `register()` in every process (launcher, each scheduler) before anything else, so
everything is registered here. A scheduler installs in two moments: `before_model_worker` (SGLang is
about to load the model and capture its decode graphs: hooks the capture must see) and
`install_scheduler` (the cache exists: everything else). Without --enable-vlcache the hooks only add
the flags to the parser and leave the resolved ServerArgs untouched: SGLang runs exactly as stock.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Callable

from sglang.srt.plugins.hook_registry import HookRegistry, HookType

from vlcache_sglang.config import RADIX_CACHE_BACKEND_NAME, VLCacheConfig
from vlcache_sglang.setup_checks import (VLCacheSetupError, check_compression, check_encoder_cache_env,
                                         check_server_args, compression_decode_advice)

logger = logging.getLogger(__name__)

_SERVER_ARGS = "sglang.srt.server_args.ServerArgs"
INIT_MODEL_WORKER = "sglang.srt.managers.scheduler.Scheduler.init_model_worker"
_registered = False


def _after_add_cli_args(result: Any, parser: argparse.ArgumentParser, *args: Any, **kwargs: Any) -> None:
    VLCacheConfig.add_cli_args(parser)


def _around_from_cli_args(original: Callable[..., Any], cls: type, ns: argparse.Namespace) -> Any:
    server_args = original(cls, ns)
    config = VLCacheConfig.from_cli_namespace(ns)
    if config.enabled:
        apply_config(server_args, config)
    elif config.compress_ratio is not None:
        raise VLCacheSetupError("--vlcache-compress-ratio is part of vlcache; pass --enable-vlcache with it "
                                "(or drop --vlcache-compress-ratio).")
    return server_args


def apply_config(server_args: Any, config: VLCacheConfig) -> None:
    """Check the resolved server args and route the tree cache to the vlcache backend.

    The config rides on the ServerArgs instance (an extra attribute survives the pickling that
    hands server args to scheduler processes).
    """
    check_server_args(server_args, config.experimental_parallel)
    check_compression(server_args, config.compress_ratio)
    advice = compression_decode_advice(server_args, config.compress_ratio)
    if advice:
        logger.warning(advice)
    _check_policy(server_args, config)
    server_args.radix_cache_backend = RADIX_CACHE_BACKEND_NAME
    server_args.vlcache = config
    # SGLang's own vision-encoder output cache (keyed by image hash) serves reused images; sized by
    # our option (a variable set to another size is refused). Scheduler processes inherit it.
    check_encoder_cache_env(config.encoder_cache_mb, os.environ.get("SGLANG_VLM_CACHE_SIZE_MB"))
    os.environ["SGLANG_VLM_CACHE_SIZE_MB"] = str(config.encoder_cache_mb)
    _install_processor_shortcut(server_args, config)
    from vlcache_sglang.hook_check import TOKENIZER_TARGETS, verify_hooks

    verify_hooks(required=TOKENIZER_TARGETS, only=TOKENIZER_TARGETS)
    logger.info("vlcache enabled: %s", config)


def _check_policy(server_args: Any, config: VLCacheConfig) -> None:
    """Build the server's policy once here (profile read and matched to the model), so a profile or
    check layer this model cannot serve stops the start-up, not the first reuse."""
    from vlcache_sglang.request_policy import PolicyResolver

    num_layers = server_args.get_model_config().num_hidden_layers
    try:
        resolver = PolicyResolver(config, num_layers)
    except (OSError, ValueError) as exc:
        raise VLCacheSetupError(str(exc)) from exc
    logger.info("vlcache recompute %s", resolver.describe())


_shortcut = None  # the one ImageProcessingShortcut of this process


def _install_processor_shortcut(server_args: Any, config: VLCacheConfig) -> None:
    """Tokenizer side (this process): key images by raw bytes, skip processing recurring ones.

    Once per process: HookRegistry skips a target patched before, so a second shortcut's hook
    would never run (and hook_check would refuse it)."""
    global _shortcut
    if _shortcut is not None:
        return
    import torch

    from sglang.srt.managers.tokenizer_manager import _determine_tensor_transport_mode

    from vlcache_sglang.processor_patch import ImageProcessingShortcut
    from vlcache_sglang.request_policy import OverrideCheck
    from vlcache_sglang.shared_pixels import sweep_stale

    dtype = server_args.get_model_config().dtype
    # SGLang's scheduler unwraps shared-memory features only where its transport is not "default".
    share_pixels = _determine_tensor_transport_mode(server_args) != "default" and not server_args.skip_tokenizer_init
    if share_pixels:
        sweep_stale()
    shortcut = _shortcut = ImageProcessingShortcut(config.processed_cache_mb * 1024 * 1024,
                                       pixel_dtype=dtype if dtype in (torch.bfloat16, torch.float16) else None,
                                       share_pixels=share_pixels)
    HookRegistry.register(
        "sglang.srt.multimodal.processors.qwen_vl.QwenVLImageProcessor.process_mm_data_async",
        shortcut.around_process,
        HookType.AROUND,
    )
    # A malformed per-request policy override is a 400 where SGLang checks sampling params.
    check = OverrideCheck(server_compresses=config.compress_ratio is not None)
    HookRegistry.register("sglang.srt.sampling.sampling_params.SamplingParams.verify", check.after_verify,
                          HookType.AFTER)
    HookRegistry.apply_hooks()


def before_model_worker(scheduler: Any, *args: Any, **kwargs: Any) -> None:
    """BEFORE hook on `Scheduler.init_model_worker` (scheduler process): the hooks SGLang's decode graph
    capture must see, which happens in there, before the cache (and `install_scheduler`) exists. Checked
    at once, so a graph is never captured over SGLang's own tables, and again with everything else."""
    config: VLCacheConfig | None = getattr(scheduler.server_args, "vlcache", None)
    if config is None or config.compress_ratio is None:
        return
    from vlcache_sglang.compression import install as compression
    from vlcache_sglang.hook_check import verify_hooks

    targets = compression.install_decode()
    verify_hooks(required=targets, only=targets)


def install_scheduler(cache: Any, ctx: Any) -> None:
    """Scheduler process (called by the vlcache cache factory once the cache exists): every scheduler
    and model hook of reuse, and of compression when --vlcache-compress-ratio is on (its decode hooks,
    installed by `before_model_worker`, are bound to the runtime here), then a check that each of them
    took; the decoder graphs are captured last."""
    from vlcache_sglang import prefill_budget, receive_guard
    from vlcache_sglang.hook_check import SCHEDULER_TARGETS, verify_hooks
    from vlcache_sglang.model_patch import install as install_model
    from vlcache_sglang.model_patch.selective_graph import layer_segments, tail_starts

    allocator = ctx.params.token_to_kv_pool_allocator
    req_to_token = ctx.params.req_to_token_pool.req_to_token
    prefill = install_model(cache.inv_freq)
    text = ctx.model_config.hf_text_config
    ratio = prefill_budget.charge_ratio(text.hidden_size, text.intermediate_size)
    prefill_budget.install(ratio)  # reused image tokens charge the chunked-prefill budget at 1/ratio
    logger.info("vlcache: a reused image token costs 1/%d of a computed token in the prefill budget", ratio)
    receive_guard.install()  # a request whose shared pixels vanished fails alone
    required = SCHEDULER_TARGETS
    if cache.config.compress_ratio is not None:
        from vlcache_sglang.compression import install as compression
        from vlcache_sglang.compression.runtime import CompressionRuntime

        runtime = CompressionRuntime(cache.policies.compression_for, cache.num_layers, req_to_token.shape[0],
                                     allocator.device, stats=cache.stats)
        required = required + compression.install(runtime)
        cache.compression = runtime
        prefill.query_observer = runtime  # the reuse loop bypasses RadixAttention: it hands Q over
        logger.info("vlcache compression: %s", cache.config.compression)
    verify_hooks(required=required)  # all or nothing: never serve half installed
    model = ctx.tp_worker.model_runner.model
    if cache.compression is not None:
        from vlcache_sglang.compression.install import compile_kernels

        compile_kernels(model.model, allocator.get_kvcache())
    # A stepped profile's layer segments get graphs of their own (the server's policy; a request's
    # override with other steps takes the other paths), and so do the layers after a plain check.
    policy = cache.policy
    prefill.capture_graphs(model.model, ctx.model_config.dtype, req_to_token, allocator.get_kvcache(),
                           layer_segments(policy.params.layer_ratios), tail_starts(policy, cache.num_layers))


def register() -> None:
    """Plugin entry point. Idempotent within a process."""
    global _registered
    if _registered:
        return
    _registered = True
    from sglang.srt.mem_cache.registry import register_radix_cache_backend, registered_radix_cache_backends

    from vlcache_sglang.radix_mm_cache import vlcache_tree_cache_factory

    HookRegistry.register(f"{_SERVER_ARGS}.add_cli_args", _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{_SERVER_ARGS}.from_cli_args", _around_from_cli_args, HookType.AROUND)
    HookRegistry.register(INIT_MODEL_WORKER, before_model_worker, HookType.BEFORE)
    if RADIX_CACHE_BACKEND_NAME not in registered_radix_cache_backends():
        register_radix_cache_backend(RADIX_CACHE_BACKEND_NAME, vlcache_tree_cache_factory)
