"""Start-up checks for --enable-vlcache: an unsupported set-up stops the server with a message
that names the problem and the fix. There is no silent fallback to stock behaviour."""

from __future__ import annotations

from typing import Any, Optional, Sequence

from vlcache_sglang.config import (
    COMPRESSION_DECODE_BACKENDS,
    RADIX_CACHE_BACKEND_NAME,
    SUPPORTED_ARCHITECTURES,
    SUPPORTED_ATTENTION_BACKENDS,
)


class VLCacheSetupError(ValueError):
    """The server was started with --enable-vlcache in a set-up vlcache cannot serve."""


def check_architecture(architectures: Optional[Sequence[str]]) -> None:
    archs = list(architectures or [])
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise VLCacheSetupError(
            f"--enable-vlcache supports {list(SUPPORTED_ARCHITECTURES)}; the model's architectures "
            f"are {archs}. Serve a Qwen2.5-VL checkpoint or drop --enable-vlcache."
        )


def check_attention_backends(server_args: Any) -> None:
    for flag, value in (
        ("--attention-backend", server_args.attention_backend),
        ("--prefill-attention-backend", server_args.prefill_attention_backend),
        ("--decode-attention-backend", server_args.decode_attention_backend),
    ):
        if flag == "--attention-backend" or value is not None:
            if value not in SUPPORTED_ATTENTION_BACKENDS:
                raise VLCacheSetupError(
                    f"--enable-vlcache needs {flag} in {list(SUPPORTED_ATTENTION_BACKENDS)}, got "
                    f"{value!r}. Pass --attention-backend flashinfer (or triton)."
                )


def check_cache_flags(server_args: Any) -> None:
    if server_args.disable_radix_cache:
        raise VLCacheSetupError("--enable-vlcache extends the radix cache; drop --disable-radix-cache.")
    if server_args.enable_hierarchical_cache:
        raise VLCacheSetupError("--enable-vlcache does not support --enable-hierarchical-cache yet.")
    if server_args.page_size not in (None, 1):
        raise VLCacheSetupError(
            f"--enable-vlcache copies KV slot by slot and needs --page-size 1, got {server_args.page_size}."
        )
    backend = server_args.radix_cache_backend
    if backend not in (None, RADIX_CACHE_BACKEND_NAME):
        raise VLCacheSetupError(
            f"--enable-vlcache selects --radix-cache-backend {RADIX_CACHE_BACKEND_NAME}; "
            f"it cannot be combined with --radix-cache-backend {backend!r}."
        )


def check_parallelism(server_args: Any, experimental: bool = False) -> None:
    """One GPU unless --vlcache-experimental-parallel; pipeline parallelism and speculative decoding never."""
    if server_args.pp_size not in (None, 1):
        # The selective forward runs every decoder layer of the model in one process.
        raise VLCacheSetupError(f"--enable-vlcache does not support --pp-size {server_args.pp_size}; drop "
                                f"--pp-size (or use --tp-size with --vlcache-experimental-parallel).")
    for flag, value in (("--tp-size", server_args.tp_size), ("--dp-size", server_args.dp_size)):
        if value not in (None, 1) and not experimental:
            raise VLCacheSetupError(
                f"--enable-vlcache has not been run with {flag} {value} yet. Drop {flag} and serve one replica "
                f"per GPU behind SGLang's router (README \"Replicas with image affinity\"), or pass "
                f"--vlcache-experimental-parallel to try it."
            )
    if getattr(server_args, "enable_dp_attention", False):
        # DP attention splits the attention TP group from the MLP's: the selective forward's score
        # all-reduce and head split assume one TP group (plain --dp-size replicas are fine).
        raise VLCacheSetupError("--enable-vlcache does not support --enable-dp-attention; drop it (plain "
                                "--dp-size with --vlcache-experimental-parallel runs independent ranks).")
    if server_args.speculative_algorithm is not None:
        raise VLCacheSetupError(
            f"--enable-vlcache does not support speculative decoding (--speculative-algorithm "
            f"{server_args.speculative_algorithm}) yet."
        )


# KV cache dtypes whose pool buffers the copy-rotate kernel reads and writes (SGLang keeps fp8 KV as
# uint8 with scales, which copy_rotate does not dequantise yet).
SUPPORTED_KV_CACHE_DTYPES = ("auto", "bf16", "bfloat16")


def check_kv_cache_dtype(server_args: Any) -> None:
    dtype = getattr(server_args, "kv_cache_dtype", "auto")
    if dtype not in SUPPORTED_KV_CACHE_DTYPES:
        raise VLCacheSetupError(
            f"--enable-vlcache copies and rotates KV in the model dtype and does not support "
            f"--kv-cache-dtype {dtype} yet (the pool would hold quantised uint8 KV). Drop "
            f"--kv-cache-dtype (or pass auto), or drop --enable-vlcache."
        )


def check_unsupported_features(server_args: Any) -> None:
    if getattr(server_args, "enable_lora", None) or getattr(server_args, "lora_paths", None):
        # The selective forward runs qkv/o/mlp on a row subset; SGLang's LoRA layers index the
        # batch's full extend tokens, and reused KV was computed under another adapter.
        raise VLCacheSetupError(
            "--enable-vlcache does not support LoRA adapters yet; drop --enable-lora/--lora-paths, "
            "or drop --enable-vlcache."
        )
    workers = getattr(server_args, "tokenizer_worker_num", 1) or 1
    if workers > 1:
        # Image keys are computed, with a per-process secret, by the tokenizer process that
        # installed the shortcut; extra tokenizer workers would neither key nor reuse images.
        raise VLCacheSetupError(
            f"--enable-vlcache keys images in one tokenizer process; got --tokenizer-worker-num "
            f"{workers}. Drop --tokenizer-worker-num (or pass 1)."
        )


def check_compression(server_args: Any, compress_ratio: Optional[float]) -> None:
    """What --vlcache-compress-ratio needs besides vlcache's own set-up (nothing when it is off)."""
    if compress_ratio is None:
        return
    decode = server_args.decode_attention_backend or server_args.attention_backend
    if decode not in COMPRESSION_DECODE_BACKENDS:
        # Decode attends each layer's own kept set: SGLang's Triton decode kernel takes the table per
        # call; FlashInfer's decode wrapper is planned once per batch for every layer.
        raise VLCacheSetupError(
            f"--vlcache-compress-ratio decodes over per-layer kept KV with SGLang's Triton decode kernel; the "
            f"decode attention backend is {decode!r}. Pass --attention-backend triton, or keep FlashInfer for "
            f"prefill with --decode-attention-backend triton."
        )
    if not server_args.disable_overlap_schedule:
        # Compaction and freeing run when a prefill's result is processed; with overlap the next batch
        # (possibly the request's first decode step, or new slots) is already launched by then.
        raise VLCacheSetupError(
            "--vlcache-compress-ratio trims a request's KV when its prefill result is processed, which overlap "
            "scheduling runs after the next batch is launched. Pass --disable-overlap-schedule."
        )
    if getattr(server_args, "disaggregation_mode", "null") not in (None, "null"):
        # A prefill server hands whole KV to a decode server; the decode side never sees a prefill.
        raise VLCacheSetupError(
            f"--vlcache-compress-ratio does not support --disaggregation-mode {server_args.disaggregation_mode} "
            f"yet; drop one of them."
        )
    if (server_args.tp_size or 1) > 1:
        # A trim frees slots chosen from a rank's own heads' scores; TP ranks share one schedule, so
        # their allocators (and admission decisions) would drift apart.
        raise VLCacheSetupError(
            f"--vlcache-compress-ratio does not support --tp-size {server_args.tp_size} yet (each rank would "
            f"keep and free different slots); drop one of them, or use --dp-size replicas."
        )
    if server_args.enable_mixed_chunk:
        raise VLCacheSetupError(
            "--vlcache-compress-ratio does not support --enable-mixed-chunk yet (decode rows would join the "
            "prefill batch whose queries it captures); drop --enable-mixed-chunk."
        )


# SGLang's Triton decode runs batch x KV-head-groups x splits programs: at batch 1 a 7B (4 KV heads)
# with its default 8 splits launches 32 programs on an H200's 132 SMs. Uncompressed 4x4K decode
# (42.3K tokens), batch 1: 14.07 ms/token at 8 splits, 7.91 ms at 64 (H200, 2026-12-01/02).
RECOMMENDED_DECODE_SPLITS = 64


def compression_decode_advice(server_args: Any, compress_ratio: Optional[float]) -> Optional[str]:
    """A warning for a compressing server whose Triton decode splits too few ways (None: nothing to say).
    Not a refusal: the set-up serves correctly, only slower at small batches of long prompts."""
    splits = getattr(server_args, "triton_attention_num_kv_splits", RECOMMENDED_DECODE_SPLITS)
    if compress_ratio is None or splits >= RECOMMENDED_DECODE_SPLITS:
        return None
    return (f"vlcache: --vlcache-compress-ratio decodes with SGLang's Triton kernel, which splits each request's "
            f"KV into at most --triton-attention-num-kv-splits {splits} parts: long prompts decode at small batch "
            f"about 1.8x slower than at {RECOMMENDED_DECODE_SPLITS} (uncompressed 4x4K, batch 1, H200). Pass "
            f"--triton-attention-num-kv-splits {RECOMMENDED_DECODE_SPLITS}.")


def check_encoder_cache_env(encoder_cache_mb: int, env_value: Optional[str]) -> None:
    """SGLang sizes its encoder cache from SGLANG_VLM_CACHE_SIZE_MB, which we set from
    --vlcache-encoder-cache-mb; a variable already set to another size would silently win."""
    if env_value is not None and env_value.strip() != str(encoder_cache_mb):
        raise VLCacheSetupError(
            f"SGLANG_VLM_CACHE_SIZE_MB={env_value} is set and --vlcache-encoder-cache-mb is {encoder_cache_mb}: "
            f"they size the same cache. Unset the variable or pass --vlcache-encoder-cache-mb {env_value.strip()}."
        )


def check_server_args(server_args: Any, experimental_parallel: bool = False) -> None:
    """All start-up checks, on a fully resolved ServerArgs."""
    from vlcache_sglang.hook_check import check_sglang_version

    check_sglang_version()
    check_attention_backends(server_args)
    check_cache_flags(server_args)
    check_parallelism(server_args, experimental_parallel)
    check_kv_cache_dtype(server_args)
    check_unsupported_features(server_args)
    check_architecture(server_args.get_model_config().hf_config.architectures)
