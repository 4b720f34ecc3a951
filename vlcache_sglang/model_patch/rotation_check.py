"""Live check: a reused image's copied-and-rotated layer-0 K equals the K the model computes fresh.

Layer-0 K depends only on a token's embedding and its position, so for every reused image token
that the policy also recomputes at layer 0 (all of them under `full`, the first k under `first_k`),
the K written by the copy-rotate kernel must equal what the forward writes over it moments later.
With VLCACHE_CHECK_ROTATION=1 the forward snapshots those slots after the copy, compares after the
model ran and logs the largest difference. It costs a copy and a device sync per batch: a
diagnostic for check scripts (benchmarks/gpu_check.sh), off by default.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional

import torch

from vlcache_sglang.reuse_planner import RequestReuse

ENV_VAR = "VLCACHE_CHECK_ROTATION"
logger = logging.getLogger(__name__)


# Read once, when the scheduler process imports the model patch: no environment lookup per forward.
ENABLED = os.environ.get(ENV_VAR, "") == "1"


def enabled() -> bool:
    return ENABLED


def recomputed_slots(plans: list[Optional[RequestReuse]]) -> torch.Tensor:
    """Destination slots of reused tokens that layer 0 recomputes (dst_slots follow reused_tokens())."""
    picked = []
    for plan in plans:
        if plan is None:
            continue
        mask = torch.isin(plan.layout.reused_tokens(), plan.selector.sets[0])
        picked.append(plan.dst_slots[mask.to(plan.dst_slots.device)])
    return torch.cat(picked) if picked else torch.empty(0, dtype=torch.int64)


class RotationCheck:
    """snapshot() after the copy, compare() after the forward: max |K_rotated - K_fresh| at layer 0."""

    def __init__(self, pool: Any, plans: list[Optional[RequestReuse]]) -> None:
        self._pool = pool
        self._slots = recomputed_slots(plans)
        self._rotated = pool.get_key_buffer(0)[self._slots].float().clone() if self._slots.numel() else None

    def compare(self) -> Optional[float]:
        if self._rotated is None:
            return None
        fresh = self._pool.get_key_buffer(0)[self._slots].float()
        diff = float((fresh - self._rotated).abs().max())
        scale = float(fresh.abs().max())
        logger.info("vlcache rotation check: layer-0 K of %d reused tokens, max |rotated - fresh| = %.3g "
                    "(max |K| = %.3g)", self._slots.numel(), diff, scale)
        return diff
