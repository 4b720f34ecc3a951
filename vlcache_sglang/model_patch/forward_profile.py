"""Diagnostic timing of the selective prefill (VLCACHE_PROFILE=1): where a reuse batch's time goes.

Logs, per prefill batch, the scheduler's time in SGLang's prepare_for_extend and in our reuse
planning; per batch that reuses images: requests, extend tokens, the distinct active-token sets and
their sizes, the attention runs and backend of each, and the device time of the KV copy and of the
whole model forward; per prefill batch without reuse (new images, exact prefix hits): requests,
extend and cached tokens and the forward's device time, the stock path to compare with. It
synchronizes the device around each step, so it slows serving; it is for benchmark
investigations, off by default.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable

import torch

ENV_VAR = "VLCACHE_PROFILE"
logger = logging.getLogger(__name__)


# Read once, when the scheduler process imports the model patch: no environment lookup per forward.
ENABLED = os.environ.get(ENV_VAR, "") == "1"


def enabled() -> bool:
    return ENABLED


def timed(fn: Callable[[], Any], on: bool) -> tuple[Any, float]:
    """fn()'s result and, when on, its wall time in ms with the device synchronized before and
    after (0.0 when off: no synchronization on the serving path)."""
    if not on:
        return fn(), 0.0
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, 1000 * (time.perf_counter() - t0)


def log_batch(sel: Any, backends: list[str], copy_ms: float, forward_ms: float, decoder_ms: float,
              num_reqs: int) -> None:
    sets = [sel.layer(layer) for layer in range(sel.num_layers) if sel.ready(layer) and sel.changed(layer)]
    desc = ", ".join(f"{rows.numel()} tok/{runs.run_len.numel()} runs" for rows, runs in sets)
    logger.info("vlcache profile: %d reqs, %d extend tokens, %d distinct sets [%s], backends %s, "
                "copy %.2f ms, forward %.2f ms (decoder layers %.2f ms)", num_reqs, sel.num_extend_tokens,
                len(sets), desc, sorted(set(backends)), copy_ms, forward_ms, decoder_ms)


def log_stock_batch(forward_batch: Any, forward_ms: float) -> None:
    extend, cached = forward_batch.extend_seq_lens_cpu, forward_batch.extend_prefix_lens_cpu
    logger.info("vlcache profile: no reuse: %d reqs, %d extend tokens, %d cached, forward %.2f ms",
                len(extend), sum(int(n) for n in extend), sum(int(n) for n in cached), forward_ms)


def log_prepare(num_reqs: int, prepare_ms: float, plan_ms: float) -> None:
    logger.info("vlcache profile: scheduler: %d reqs, prepare_for_extend %.2f ms, reuse planning %.2f ms",
                num_reqs, prepare_ms, plan_ms)
