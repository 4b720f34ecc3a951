"""Qwen2.5-VL model-side pieces: rotary parameters and the selective-prefill forward.

`install()` is called by the vlcache cache factory inside each scheduler process, so the hooks
exist only in servers started with --enable-vlcache.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

_installed: Optional[Any] = None  # the SelectivePrefill of this process


def install(inv_freq: torch.Tensor) -> Any:
    """Hook the scheduler and the model; `inv_freq`: the model's rotary inverse frequencies (device).
    Returns the process's SelectivePrefill (its graphs are captured by the caller at start-up)."""
    global _installed
    if _installed is not None:
        return _installed
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    from vlcache_sglang.model_patch.selective_prefill import SelectivePrefill
    from vlcache_sglang.reuse_planner import around_prepare_for_extend

    prefill = SelectivePrefill(inv_freq)
    HookRegistry.register("sglang.srt.managers.schedule_batch.ScheduleBatch.prepare_for_extend",
                          around_prepare_for_extend, HookType.AROUND)
    HookRegistry.register("sglang.srt.models.qwen2_5_vl.Qwen2_5_VLForConditionalGeneration.forward",
                          prefill.around_vl_forward, HookType.AROUND)
    HookRegistry.register("sglang.srt.models.qwen2.Qwen2Model.forward", prefill.around_lm_forward, HookType.AROUND)
    HookRegistry.apply_hooks()
    _installed = prefill
    return prefill
