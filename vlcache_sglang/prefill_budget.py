"""Chunked-prefill budget for reused images: charge a prefill for the tokens it computes, not copies.

SGLang's `PrefillAdder` charges every extend token to the chunk budget (`--chunked-prefill-size`)
and to `--max-prefill-tokens`. A request with four reused 4K images (42K image tokens, ~70 text
tokens) therefore runs as six 8K chunks, six forwards and six scheduler rounds, although under policy
`none` it computes ~70 tokens. Those budgets bound a forward's compute and activation memory, so here
a reused-image token the policy does not recompute costs 1/ratio of a computed token, where `ratio`
is what a computed token holds in activation memory over what a copied one does (`charge_ratio`).
The KV budgets (`rem_total_tokens`: slots) still count every token: the request needs all its slots.

Two AROUND hooks on `PrefillAdder.add_one_req` / `add_chunked_req` hand SGLang a chunk budget widened
to the extend length whose *charge* fits the real budget, let SGLang decide (fit or truncate), then
charge the budgets for what it took. The image nodes a charge counted on are locked at once (and
released with the planner's locks when the request's prefill is cached), so the slot allocation of
this very batch cannot evict them and turn a cheap request into a 42K-token computed one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any, Callable, Optional

from vlcache_sglang.recompute_policy import ImageSpan, RecomputePolicy, TokenLayout
from vlcache_sglang.reuse_planner import image_grid, image_items, image_start_pos, req_state, reuse_allowed

if TYPE_CHECKING:
    from sglang.srt.managers.schedule_batch import Req
    from sglang.srt.managers.schedule_policy import PrefillAdder

    from vlcache_sglang.radix_mm_cache import MultimodalRadixCache

logger = logging.getLogger(__name__)


def charge_ratio(hidden_size: int, intermediate_size: int) -> int:
    """How many copied tokens cost one computed token in a prefill's activation memory.

    A copied (reused, not recomputed) token still has its embedding row, its image-embedding row
    while SGLang merges them, and its row of the scattered-back output: 3 x hidden. A computed token
    adds the decoder layer's peak, the MLP's gate/up and activation (3 x intermediate) next to its
    hidden, residual and attention rows: ~3 x intermediate + 4 x hidden. Qwen2.5-VL-7B: 6.
    """
    return max(1, (3 * intermediate_size + 4 * hidden_size) // (3 * hidden_size))


@dataclasses.dataclass(frozen=True)
class ReuseCharge:
    """Budget cost of a request's extend tokens [start, end) when some are copied, not computed."""

    start: int
    end: int
    free_runs: tuple[tuple[int, int], ...]  # sorted, disjoint [a, b): reused tokens not recomputed
    ratio: int
    nodes: tuple[Any, ...] = ()  # the image nodes the free runs come from

    def cost(self, upto: int) -> int:
        """Charge of the extend tokens [start, upto): computed ones 1 each, copied ones 1/ratio."""
        free = sum(max(0, min(b, upto) - max(a, self.start)) for a, b in self.free_runs)
        computed = (upto - self.start) - free
        return computed + -(-free // self.ratio)

    def limit(self, budget: int) -> int:
        """The most extend tokens whose charge fits `budget` (cost is monotone: binary search)."""
        lo, hi = 0, self.end - self.start
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.cost(self.start + mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _recomputed_head(policy: RecomputePolicy, span: ImageSpan, num_layers: int) -> int:
    """Tokens of a reused span the policy may recompute at layer 0 (the widest layer), counted as
    the span's first ones: exact for first_k, a charge-only approximation for ratio policies."""
    layout = TokenLayout(seq_len=span.end, prefix_len=span.start, images=(span,))
    return min(span.num_tokens, policy.budget(layout, 0, num_layers))


def reuse_charge(req: "Req", cache: "MultimodalRadixCache", ratio: int) -> Optional[ReuseCharge]:
    """The charge of `req`'s remaining extend tokens, or None when none of its images is stored."""
    if not reuse_allowed(req):  # the planner's own predicate: charged as reused only if planned so
        return None
    start, end = len(req.prefix_indices), len(req.full_untruncated_fill_ids)
    last_prompt = len(req.origin_input_ids) - 1  # always computed (its logits are read)
    runs, nodes = [], []
    for item, img_start, img_end in image_items(req.multimodal_inputs):
        lo, hi = max(img_start, start), min(img_end, end, last_prompt)
        if lo >= hi:
            continue
        if image_start_pos(req.multimodal_inputs, img_start) is None:
            continue  # the planner cannot place it: no reuse, no credit
        node = cache.peek_image(item.hash, image_grid(item), img_end - img_start, getattr(req, "extra_key", None))
        if node is None:
            continue
        span = ImageSpan(lo, hi - lo, reused=True, offset_in_image=lo - img_start, image_tokens=img_end - img_start)
        head = _recomputed_head(cache.policy_for(req), span, cache.num_layers)
        if head < span.num_tokens:
            runs.append((lo + head, hi))
            nodes.append(node)
    if not runs:
        return None
    return ReuseCharge(start, end, tuple(runs), ratio, tuple(nodes))


class PrefillBudget:
    """The AROUND hooks; one instance per scheduler process."""

    def __init__(self, ratio: int) -> None:
        self.ratio = ratio

    def around_add_one_req(self, original: Callable[..., Any], adder: "PrefillAdder", req: "Req",
                           *args: Any, **kwargs: Any) -> Any:
        charge = self._charge(adder, req)
        if charge is None:
            return original(adder, req, *args, **kwargs)
        result, added = self._run_widened(original, adder, req, charge, *args, **kwargs)
        # SGLang's own verdict was taken against the widened budget; re-ask with the charged one.
        return adder.budget_state() if added else result

    def around_add_chunked_req(self, original: Callable[..., Any], adder: "PrefillAdder", req: "Req") -> Any:
        charge = self._charge(adder, req)
        if charge is None:
            return original(adder, req)
        result, _ = self._run_widened(original, adder, req, charge)
        return result  # the request if still truncated: the same answer under either budget

    def _charge(self, adder: "PrefillAdder", req: "Req") -> Optional[ReuseCharge]:
        from vlcache_sglang.radix_mm_cache import MultimodalRadixCache

        cache = adder.tree_cache
        if adder.rem_chunk_tokens is None or not isinstance(cache, MultimodalRadixCache) or cache.disable:
            return None
        return reuse_charge(req, cache, self.ratio)

    def _run_widened(self, original: Callable[..., Any], adder: "PrefillAdder", req: "Req",
                     charge: ReuseCharge, *args: Any, **kwargs: Any) -> tuple[Any, bool]:
        """Run SGLang's decision under the widened chunk budget; charge what it took.

        Returns SGLang's result and whether the request was queued."""
        chunk_before, input_before = adder.rem_chunk_tokens, adder.rem_input_tokens
        queued = len(adder.can_run_list)
        adder.rem_chunk_tokens = charge.limit(chunk_before)
        try:
            result = original(adder, req, *args, **kwargs)
        finally:
            added = len(adder.can_run_list) > queued and adder.can_run_list[-1] is req
            if added:
                cost = adder.ceil_paged_tokens(charge.cost(req.extend_range.end))
                adder.rem_chunk_tokens = chunk_before - cost
                adder.rem_input_tokens = input_before - cost
            else:
                adder.rem_chunk_tokens = chunk_before
        if added:
            self._lock_nodes(adder.tree_cache, req, charge)
            logger.debug("vlcache: req %s extend [%d, %d) charged %d of chunk budget %d", req.rid,
                         charge.start, req.extend_range.end, chunk_before - adder.rem_chunk_tokens, chunk_before)
        return result, added

    @staticmethod
    def _lock_nodes(cache: "MultimodalRadixCache", req: "Req", charge: ReuseCharge) -> None:
        state = req_state(req)
        for node in charge.nodes:
            cache.inc_lock_ref(node)
            state.locked.append(node)


_installed: Optional[PrefillBudget] = None


def install(ratio: int) -> PrefillBudget:
    """Hook SGLang's PrefillAdder in this (scheduler) process. Idempotent."""
    global _installed
    if _installed is not None:
        return _installed
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    budget = _installed = PrefillBudget(ratio)
    base = "sglang.srt.managers.schedule_policy.PrefillAdder"
    HookRegistry.register(f"{base}.add_one_req", budget.around_add_one_req, HookType.AROUND)
    HookRegistry.register(f"{base}.add_chunked_req", budget.around_add_chunked_req, HookType.AROUND)
    HookRegistry.apply_hooks()
    return budget
