"""The hooks of compression, registered for the plugin's composition root (`plugin.py`), which
verifies them with every other hook (`hook_check.verify_hooks`).

Two moments: the decode hooks (`install_decode`: the Triton backend's and the graph runner's) before
SGLang captures its decode graphs (`Scheduler.init_model_worker`; the capture records our
`forward_decode`), the prefill hooks (`install`) once the cache and its runtime exist; `install` binds
the runtime to the decode hooks. Targets are SGLang's own and none is shared with reuse's hooks,
so the two install independently (HookRegistry skips a target patched before: a second registration
there would never take).
"""

from __future__ import annotations

from typing import Any, Optional

from vlcache_sglang.compression.decode_attention import KeptDecodeAttention
from vlcache_sglang.compression.decode_graph import KeptDecodeGraph
from vlcache_sglang.compression.runtime import CompressionRuntime
from vlcache_sglang.kernels.attention_scores import compile_for
from vlcache_sglang.model_patch.selective_graph import AttentionShape
from vlcache_sglang.setup_checks import VLCacheSetupError

_TRITON = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend"
RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"
ATTENTION = "sglang.srt.layers.radix_attention.RadixAttention.forward"
INIT_METADATA = f"{_TRITON}.init_forward_metadata"
FORWARD_DECODE = f"{_TRITON}.forward_decode"
INIT_GRAPH_STATE = f"{_TRITON}.init_cuda_graph_state"
GRAPH_METADATA = f"{_TRITON}.init_forward_metadata_out_graph"
CAN_RUN_GRAPH = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph"
# Without any of these a compressed request would be trimmed and decoded over the wrong tables, or
# never captured, or replayed through a graph that reads SGLang's own tables: all are required once
# compression is on.
DECODE_TARGETS = (INIT_METADATA, FORWARD_DECODE, INIT_GRAPH_STATE, GRAPH_METADATA, CAN_RUN_GRAPH)
COMPRESSION_TARGETS = (RUN_BATCH, ATTENTION) + DECODE_TARGETS

_graph: Optional[KeptDecodeGraph] = None
_installed: Optional[CompressionRuntime] = None


def install_decode() -> tuple[str, ...]:
    """Hook the decode path of this scheduler process, eager and graph (before its decode graphs are
    captured); returns the targets the caller must verify. Once per process."""
    global _graph
    if _graph is not None:
        return DECODE_TARGETS
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    decode = KeptDecodeAttention()
    graph = KeptDecodeGraph(decode)
    HookRegistry.register(INIT_METADATA, decode.around_init_forward_metadata, HookType.AROUND)
    HookRegistry.register(FORWARD_DECODE, decode.around_forward_decode, HookType.AROUND)
    HookRegistry.register(INIT_GRAPH_STATE, graph.after_init_cuda_graph_state, HookType.AFTER)
    HookRegistry.register(GRAPH_METADATA, graph.around_init_forward_metadata_out_graph, HookType.AROUND)
    HookRegistry.register(CAN_RUN_GRAPH, graph.around_can_run_graph, HookType.AROUND)
    HookRegistry.apply_hooks()
    _graph = graph
    return DECODE_TARGETS


def install(runtime: CompressionRuntime) -> tuple[str, ...]:
    """Hook this scheduler process's prefill for `runtime` and bind it to the decode hooks (`install_decode`,
    which must have run first); returns the targets the caller must verify. Once per process (a second
    runtime's hooks would not take)."""
    global _installed
    if _installed is not None:
        if _installed is not runtime:
            raise RuntimeError("compression hooks are installed once per scheduler process")
        return COMPRESSION_TARGETS
    if _graph is None:
        raise VLCacheSetupError("vlcache compression: the decode hooks were not installed before SGLang captured "
                                "its decode graphs (the plugin's BEFORE hook on Scheduler.init_model_worker did not "
                                "run); refusing to replay graphs over SGLang's own tables.")
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(RUN_BATCH, runtime.before_run_batch, HookType.BEFORE)
    HookRegistry.register(ATTENTION, runtime.capture_attention, HookType.AROUND)
    HookRegistry.apply_hooks()
    _graph.bind(runtime.kept, lambda: runtime.live_trimmed, runtime.stats)
    _installed = runtime
    return COMPRESSION_TARGETS


def compile_kernels(lm: Any, kv_pool: Any) -> None:
    """Build the scoring pass's Triton binaries at start-up (CUDA only: the interpreter compiles nothing),
    for this rank's head shape, so that no compressed request compiles them inside its TTFT."""
    k_buffer = kv_pool.k_buffer[0]
    if k_buffer.is_cuda:
        compile_for(AttentionShape.of(lm).num_qo_heads, k_buffer)
