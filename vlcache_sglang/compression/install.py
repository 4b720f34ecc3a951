"""The hooks of compression, registered for the plugin's composition root (`plugin.install_scheduler`),
which verifies them with every other hook (`hook_check.verify_hooks`).

Targets are SGLang's own and none is shared with reuse's hooks, so the two install independently
(HookRegistry skips a target patched before: a second registration there would never take).
"""

from __future__ import annotations

from typing import Optional

from vlcache_sglang.compression.decode_attention import KeptDecodeAttention
from vlcache_sglang.compression.runtime import CompressionRuntime

_TRITON = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend"
RUN_BATCH = "sglang.srt.managers.scheduler.Scheduler.run_batch"
ATTENTION = "sglang.srt.layers.radix_attention.RadixAttention.forward"
INIT_METADATA = f"{_TRITON}.init_forward_metadata"
FORWARD_DECODE = f"{_TRITON}.forward_decode"
CAN_RUN_GRAPH = "sglang.srt.model_executor.runner.decode_cuda_graph_runner.DecodeCudaGraphRunner.can_run_graph"
# Without any of these a compressed request would be trimmed and decoded over the wrong tables, or
# never captured: all are required once compression is on.
COMPRESSION_TARGETS = (RUN_BATCH, ATTENTION, INIT_METADATA, FORWARD_DECODE, CAN_RUN_GRAPH)

_installed: Optional[CompressionRuntime] = None


def install(runtime: CompressionRuntime) -> tuple[str, ...]:
    """Hook this scheduler process for `runtime`; returns the targets the caller must verify. Once per
    process (a second runtime's hooks would not take)."""
    global _installed
    if _installed is not None:
        if _installed is not runtime:
            raise RuntimeError("compression hooks are installed once per scheduler process")
        return COMPRESSION_TARGETS
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    decode = KeptDecodeAttention(runtime.kept, lambda: runtime.live_trimmed)
    HookRegistry.register(RUN_BATCH, runtime.before_run_batch, HookType.BEFORE)
    HookRegistry.register(ATTENTION, runtime.capture_attention, HookType.AROUND)
    HookRegistry.register(INIT_METADATA, decode.around_init_forward_metadata, HookType.AROUND)
    HookRegistry.register(FORWARD_DECODE, decode.around_forward_decode, HookType.AROUND)
    HookRegistry.register(CAN_RUN_GRAPH, decode.around_can_run_graph, HookType.AROUND)
    HookRegistry.apply_hooks()
    _installed = runtime
    return COMPRESSION_TARGETS
