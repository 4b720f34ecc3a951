"""Scheduler side of reuse: after SGLang allocates a prefill batch's KV slots, find the reused images.

Runs inside `ScheduleBatch.prepare_for_extend` (AROUND hook), once per prefill batch (and per chunk of
a chunked request). For each request it

* looks up every image that lies (partly) in this chunk's extend range [prefix_len, seq_len) in the
  image store (key = the image item's hash; grid and token count must match);
* locks each hit node until the request's prefill is cached (so eviction can't free its slots
  while the forward still reads them), and records the slot copy src -> dst with the position shift
  δ = st_new − st_cached (st: the image's M-RoPE start);
* hands the request's recompute policy (the server's, or the request's own override) a
  LayerSelector: static policies are planned for every layer here, observing ones up to their
  check layer (the decoder loop decides the rest);
* counts the reused tokens that no layer computes as cached tokens (usage.cached_tokens); the
  per-layer recompute counts arrive when the forward has decided every layer (`RequestReuse.report`).

The result rides to the model forward on the request's MultimodalInputs, keyed by prefix length so a
later chunk of the same request can never pick up a stale plan.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from vlcache_sglang.image_key import KEY_ATTR
from vlcache_sglang.layer_selector import LayerSelector, ReuseOutcome
from vlcache_sglang.recompute_policy import ImageSpan, RecomputePolicy, TokenLayout

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req, ScheduleBatch

    from vlcache_sglang.radix_mm_cache import MultimodalRadixCache

logger = logging.getLogger(__name__)

PLANS_ATTR = "vlcache_plans"  # on MultimodalInputs: {prefix_len: RequestReuse}


@dataclasses.dataclass
class RequestReuse:
    """What one request's prefill chunk reuses, and what each layer computes."""

    prefix_len: int
    seq_len: int
    layout: TokenLayout
    selector: LayerSelector  # S_l, absolute token indices (CPU int64), per layer as decided
    src_slots: torch.Tensor  # [n] image-node slots to copy from (device)
    dst_slots: torch.Tensor  # [n] this request's slots (device)
    delta: torch.Tensor  # [n] position shift per token (device)
    # Called by the forward once every layer is decided (the scheduler's stats; same process).
    report: Optional[Callable[[ReuseOutcome], None]] = None

    @property
    def reused_tokens(self) -> int:
        return int(self.src_slots.numel())


@dataclasses.dataclass
class ReqReuseState:
    """Per-request bookkeeping kept on the Req between scheduling and caching."""

    locked: list[Any] = dataclasses.field(default_factory=list)  # image nodes locked for this request
    reused_keys: set[int] = dataclasses.field(default_factory=set)  # images taken from the store
    stored_keys: set[int] = dataclasses.field(default_factory=set)  # images offered to the store
    # Token index of the first reused image whose KV is approximate (a policy other than `full`):
    # images after it were computed over approximate KV, second-generation, and are not stored.
    approximate_from: Optional[int] = None
    retractions: int = 0  # the request's retraction_count when this state began


def req_state(req: "Req") -> ReqReuseState:
    """The request's reuse bookkeeping. A retracted request (SGLang counts `retraction_count`) is
    prefilled again from scratch: what its earlier prefill reused and stored says nothing about the
    new one (a stale `reused_keys` would keep an image computed this time out of the store), so its
    state starts over; locks still held carry over, to be released as ever."""
    state = getattr(req, "vlcache_state", None)
    retractions = getattr(req, "retraction_count", 0)
    if state is None or state.retractions != retractions:
        state = ReqReuseState(locked=state.locked if state is not None else [], retractions=retractions)
        req.vlcache_state = state
    return state


def counts_cached_tokens(req: "Req") -> bool:
    """Whether this prefill adds to `req.cached_tokens`: as SGLang's own count, only before the
    request was first retracted (`retracted_stain`), so a re-prefill does not count its reuse twice."""
    return not getattr(req, "retracted_stain", False)


def image_items(mm_inputs: Any) -> list[tuple[Any, int, int]]:
    """(item, start, end_exclusive) for each image item with a single run of pad tokens, keyed by
    our tokenizer-side hook (its hash still equals our key: not a client's `mm_hashes`, not one of
    SGLang's unkeyed 64-bit pixel hashes)."""
    out = []
    for item in getattr(mm_inputs, "mm_items", None) or []:
        if (not item.is_image() or not item.offsets or len(item.offsets) != 1 or item.hash is None
                or getattr(item, KEY_ATTR, None) != item.hash):
            logger.debug("vlcache: image item not reusable: modality=%s offsets=%s hash=%s", item.modality,
                        item.offsets, item.hash)
            continue
        start, end_incl = item.offsets[0]
        out.append((item, int(start), int(end_incl) + 1))
    return out


def image_grid(item: Any) -> tuple[int, int, int] | None:
    """The item's (t, h, w) grid, or None when it has none we can read (a counted miss, never an
    exception in the scheduler)."""
    grid = getattr(item, "model_specific_data", {}).get("image_grid_thw")
    try:
        values = torch.as_tensor(grid).reshape(-1).tolist()
    except (TypeError, ValueError, RuntimeError):
        return None
    if len(values) != 3 or not all(isinstance(v, int) and v > 0 for v in values):
        return None
    return tuple(values)


def image_start_pos(mm_inputs: Any, start: int) -> int | None:
    """The image's M-RoPE start `st`: its first token sits at (0, 0, 0) + st on all three axes.
    None when the positions are missing or not of that form (client-supplied processor output)."""
    positions = getattr(mm_inputs, "mrope_positions", None)
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2 or positions.shape[0] != 3 \
            or not 0 <= start < positions.shape[1]:
        return None
    st, h, w = (int(x) for x in positions[:, start].tolist())
    return st if h == st and w == st else None


def reuse_allowed(req: "Req") -> bool:
    """Whether any image of `req` may be served from the store: the one predicate that admission
    (`prefill_budget.reuse_charge`) and planning (`plan_batch`) share, so a request is never charged
    as reused and then computed in full.

    Not for requests that read hidden states (skipped tokens have none) or input-token logprobs
    (they need every token from `logprob_start_len` at the last layer). -1 and starts at or past
    the prompt's end mean output logprobs only (the OpenAI `logprobs` option), which need only the
    last prompt token, always computed."""
    if req.multimodal_inputs is None or getattr(req, "return_hidden_states", False):
        return False
    if not req.return_logprob:
        return True
    start = req.logprob_start_len
    return start == -1 or start >= len(req.origin_input_ids)


def plan_request(
    req: "Req",
    prefix_len: int,
    seq_len: int,
    out_loc: torch.Tensor,
    cache: "MultimodalRadixCache",
    policy: RecomputePolicy,
    num_layers: int,
) -> RequestReuse | None:
    """Reuse plan of one request's chunk; `out_loc` are its new slots for [prefix_len, seq_len)."""
    mm = req.multimodal_inputs
    is_last_chunk = seq_len >= len(req.origin_input_ids)
    spans, src, dst, delta = [], [], [], []
    state = req_state(req)
    namespace = getattr(req, "extra_key", None)
    for item, start, end in image_items(mm):
        lo = max(start, prefix_len)
        hi = min(end, seq_len - 1 if is_last_chunk else seq_len)  # the last prompt token is always computed
        if lo >= hi:
            continue
        start_pos = image_start_pos(mm, start)
        grid = image_grid(item) if start_pos is not None else None  # None: a counted mismatch below
        node = cache.lookup_image(item.hash, grid, end - start, count=start >= prefix_len, namespace=namespace)
        logger.debug("vlcache: req %s image %032x tokens [%d, %d) of chunk [%d, %d): %s", req.rid, item.hash,
                    start, end, prefix_len, seq_len, "hit" if node is not None else "miss")
        if node is None:
            continue
        cache.inc_lock_ref(node)
        state.locked.append(node)
        state.reused_keys.add(item.hash)
        if policy.name != "full" and (state.approximate_from is None or start < state.approximate_from):
            state.approximate_from = start
        shift = start_pos - node.vl_entry.start_pos
        spans.append(ImageSpan(lo, hi - lo, reused=True, offset_in_image=lo - start, image_tokens=end - start))
        src.append(node.value[lo - start : hi - start])
        dst.append(out_loc[lo - prefix_len : hi - prefix_len])
        delta.append(torch.full((hi - lo,), shift, dtype=torch.int64))
    if not spans:
        return None
    layout = TokenLayout(seq_len=seq_len, prefix_len=prefix_len, images=tuple(spans))
    device = out_loc.device
    return RequestReuse(
        prefix_len=prefix_len,
        seq_len=seq_len,
        layout=layout,
        selector=LayerSelector(policy, layout, num_layers),
        src_slots=torch.cat(src).to(device),
        dst_slots=torch.cat(dst).to(device),
        delta=torch.cat(delta).to(device),
    )


def report_outcome(cache: "MultimodalRadixCache", req: Any, counted: int, outcome: ReuseOutcome) -> None:
    """After the forward: the chunk's per-layer counts, and what a probe's replan computed beyond the
    S_0 that `plan_batch` counted (an image it recomputes whole is not served from cache)."""
    extra = outcome.computed_tokens - counted
    if extra > 0:
        if counts_cached_tokens(req):
            req.cached_tokens -= extra
        cache.stats.recomputed_tokens += extra
    cache.count_outcome(outcome)  # publishes the stats


def plan_batch(batch: "ScheduleBatch", cache: "MultimodalRadixCache") -> None:
    """Attach a RequestReuse to each request of a freshly prepared extend batch that reuses images."""
    pt = 0
    for i, req in enumerate(batch.reqs):
        prefix_len, extend_len = int(batch.prefix_lens[i]), int(batch.extend_lens[i])
        if reuse_allowed(req):
            out_loc = batch.out_cache_loc[pt : pt + extend_len]
            plan = plan_request(req, prefix_len, prefix_len + extend_len, out_loc, cache,
                                cache.policy_for(req), cache.num_layers)
            if plan is not None:
                plans = getattr(req.multimodal_inputs, PLANS_ATTR, None)
                if plans is None:
                    plans = {}
                    setattr(req.multimodal_inputs, PLANS_ATTR, plans)
                plans[prefix_len] = plan
                s0 = plan.selector.sets[0]  # the widest set: layer 0 is never observed
                recomputed = int(plan.layout.is_reused(s0).sum())
                cache.stats.reused_tokens += plan.reused_tokens
                cache.stats.recomputed_tokens += recomputed
                if counts_cached_tokens(req):
                    req.cached_tokens += plan.reused_tokens - recomputed
                plan.report = functools.partial(report_outcome, cache, req, recomputed)
        pt += extend_len
    cache.publish_stats()


def around_prepare_for_extend(original: Callable[..., Any], batch: "ScheduleBatch", *args: Any, **kwargs: Any) -> Any:
    from vlcache_sglang.model_patch import forward_profile
    from vlcache_sglang.radix_mm_cache import MultimodalRadixCache

    profile = forward_profile.enabled()
    result, prepare_ms = forward_profile.timed(lambda: original(batch, *args, **kwargs), profile)
    if isinstance(batch.tree_cache, MultimodalRadixCache) and batch.forward_mode.is_extend():
        plan_ms = forward_profile.timed(lambda: plan_batch(batch, batch.tree_cache), profile)[1]
        if profile:
            forward_profile.log_prepare(len(batch.reqs), prepare_ms, plan_ms)
    return result
