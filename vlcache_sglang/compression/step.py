"""The seam after prefill: a `PostPrefillStep` runs once per request when its prefill is complete.

REVIEW finding 10: the only post-prefill hook used to be the cache's. This ABC is the place for
work that needs a request's whole prompt KV and the queries of its last tokens, before the first
decode step: VL-Cache compression (`compressor.py`) is the first. The step is told, before the
forward, which query rows to keep (`query_positions`): the model patch captures those rows of Q
at every layer (after RoPE) while the prefill runs, and the caller hands them over in a
`PrefillView` after the forward (`query_capture.py`, `runtime.py`; off unless configured).

A step that trims a request's KV returns its plan; the caller then frees the plan's slots to the
allocator and marks the request (`mark_kv_trimmed`). The cache checks `is_kv_trimmed` before it
inserts into the radix tree or stores images, and frees a trimmed request's slots through
`CompressionPlan.slots_to_free_on_finish` (see `selection.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional, Sequence

import torch

from vlcache_sglang.compression.selection import CompressionPlan

KV_TRIMMED_ATTR = "vlcache_kv_plan"  # on SGLang's Req: the CompressionPlan of a trimmed request


@dataclass(frozen=True)
class PrefillView:
    """What a step sees of one request whose prefill forward just completed."""

    req_pool_idx: int  # the request's req_to_token row
    prompt_len: int  # m: prompt tokens with KV in the pool (the whole prompt, every chunk)
    shared_prefix_len: int  # p = req.cache_protected_len: radix-prefix slots the request does not own
    req_to_token: torch.Tensor  # [rows, max_context] int32, SGLang's ReqToTokenPool.req_to_token
    k_buffers: Sequence[torch.Tensor]  # L x [slots, num_kv_heads, head_dim] (MHATokenToKVPool.k_buffer)
    v_buffers: Sequence[torch.Tensor]  # L x [slots, num_kv_heads, head_dim]
    query_positions: torch.Tensor  # [tau] int64, what `query_positions` asked for
    queries: Sequence[torch.Tensor]  # L x [tau, num_qo_heads, head_dim], Q after RoPE, rows as positions
    sm_scale: float  # the attention's scale (1 / sqrt(head_dim) for Qwen2.5-VL)

    def __post_init__(self) -> None:
        layers = len(self.k_buffers)
        if len(self.v_buffers) != layers or len(self.queries) != layers:
            raise ValueError(f"one K, V and query tensor per layer: got {len(self.k_buffers)}, "
                             f"{len(self.v_buffers)}, {len(self.queries)}")
        if not 0 <= self.shared_prefix_len <= self.prompt_len:
            raise ValueError(f"shared_prefix_len {self.shared_prefix_len} must lie in [0, {self.prompt_len}]")
        tau = self.query_positions.numel()
        for layer, q in enumerate(self.queries):
            if q.dim() != 3 or q.shape[0] != tau:
                raise ValueError(f"layer {layer}: queries must be [{tau}, qo_heads, head_dim], got {tuple(q.shape)}")

    @property
    def row_slots(self) -> torch.Tensor:
        """[m] slots of the prompt: req_to_token[req_pool_idx, :m]."""
        return self.req_to_token[self.req_pool_idx, : self.prompt_len]


@dataclass(frozen=True)
class PostPrefillResult:
    plan: Optional[CompressionPlan] = None  # None: the request's KV is untouched
    info: Optional[dict[str, Any]] = None  # per-request numbers to log or export (budgets, sparsity)

    @property
    def kv_trimmed(self) -> bool:
        return self.plan is not None


class PostPrefillStep(ABC):
    """Once per request, after its prefill's forward, before its first decode step."""

    name: ClassVar[str]

    @abstractmethod
    def query_positions(self, prompt_len: int, image_offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
        """[tau] int64 prompt positions whose Q rows (every layer) the forward must keep for `run`.

        image_offsets: (start, end) per image, end inclusive (SGLang's MultimodalDataItem.offsets).
        """

    @abstractmethod
    def run(self, view: PrefillView) -> PostPrefillResult:
        """Do the step's work on the request's KV (in the pool buffers). Must not free or allocate:
        the caller owns the allocator and applies the returned plan's frees."""


def mark_kv_trimmed(req: Any, plan: CompressionPlan) -> None:
    """Record on the request that its KV was trimmed by `plan` (the cache then skips insertion)."""
    if getattr(req, KV_TRIMMED_ATTR, None) is not None:
        raise RuntimeError("request's KV is already trimmed: a step must run once per request")
    setattr(req, KV_TRIMMED_ATTR, plan)


def is_kv_trimmed(req: Any) -> bool:
    """Whether the cache must never insert this request into the radix tree or the image store."""
    return getattr(req, KV_TRIMMED_ATTR, None) is not None


def trimmed_plan(req: Any) -> Optional[CompressionPlan]:
    return getattr(req, KV_TRIMMED_ATTR, None)


def clear_kv_trimmed(req: Any) -> None:
    """The request's trimmed KV was freed (finish, abort, retraction): a retracted request is
    prefilled again in full, and may be trimmed again."""
    setattr(req, KV_TRIMMED_ATTR, None)
