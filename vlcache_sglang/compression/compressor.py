"""VL-Cache compression as a PostPrefillStep: score, budget, select, compact.

Per request, after its prefill: s_l(j) and gamma_l from the post-vision queries (`scores.py`),
beta_l from the gammas (or alpha everywhere for the uniform baseline, `budget.py`), kept_l =
p + max(floor(beta_l * (m - p)), w) with p the shared radix prefix (kept whole) and w the voting
queries plus the recent window, the top-scored tokens per layer (`selection.py`), and the kept K/V
moved into the front of the request's own slots. The
caller frees `plan.free_slots` and marks the request trimmed. alpha = 1 keeps every token and
returns no plan: the request is served exactly as without compression.
"""

from __future__ import annotations

from typing import Sequence

import torch

from vlcache_sglang.compression.budget import kept_counts, layer_budgets
from vlcache_sglang.compression.config import CompressionConfig
from vlcache_sglang.compression.scores import Scorer, post_vision_positions, score_request
from vlcache_sglang.compression.selection import apply_compaction, plan_compaction, select_layers
from vlcache_sglang.compression.step import PostPrefillResult, PostPrefillStep, PrefillView
from vlcache_sglang.kernels.attention_scores import post_vision_scores


class VLCacheCompression(PostPrefillStep):
    name = "vlcache_compression"

    def __init__(self, config: CompressionConfig, scorer: Scorer = post_vision_scores) -> None:
        if not config.enabled:
            raise ValueError("VLCacheCompression needs compress_ratio set (build_post_prefill_step returns None "
                             "when compression is off)")
        self.config = config
        self._scorer = scorer

    def query_positions(self, prompt_len: int, image_offsets: Sequence[tuple[int, int]]) -> torch.Tensor:
        return post_vision_positions(prompt_len, image_offsets, self.config.fallback_queries,
                                     self.config.max_queries)

    def run(self, view: PrefillView) -> PostPrefillResult:
        cfg, m = self.config, view.prompt_len
        alpha = float(cfg.compress_ratio)
        if alpha >= 1.0:
            return PostPrefillResult(None, {"alpha": alpha})
        layers = score_request(view.queries, view.k_buffers, view.req_to_token, view.req_pool_idx,
                               view.query_positions, m, view.sm_scale, cfg.sparsity_threshold, self._scorer)
        sparsity = [layer.sparsity for layer in layers]
        budgets = layer_budgets(cfg.budget, sparsity, alpha, cfg.max_budget, cfg.uniform_share)
        # Only the request's own tokens [p, m) are compressed: the radix prefix stays whole at every
        # layer (tree slots cannot be freed, and a whole prefix keeps each layer's table contiguous).
        # The voting queries are the last prompt tokens: they and the recent window always stay, and so
        # do the first sink_tokens of the prompt (those inside the prefix already are).
        p = view.shared_prefix_len
        protected = max(m - int(view.query_positions.min()), cfg.recent_window)
        sinks = max(0, cfg.sink_tokens - p)
        counts = kept_counts(budgets, m - p, min_keep=protected + sinks)
        info = {"alpha": alpha, "sparsity": sparsity, "budgets": budgets.tolist(), "kept": [p + c for c in counts]}
        if all(c == m - p for c in counts):
            return PostPrefillResult(None, info)
        own = select_layers([layer.token_scores[p:] for layer in layers], counts, protected, sinks)
        prefix = torch.arange(p, dtype=torch.int64, device=own[0].device)
        kept = [torch.cat([prefix, p + o]) for o in own]
        plan = plan_compaction(view.row_slots, kept, p)
        apply_compaction(view.k_buffers, view.v_buffers, plan)
        info["freed"] = int(plan.free_slots.numel())
        return PostPrefillResult(plan, info)


def build_post_prefill_step(config: CompressionConfig) -> "PostPrefillStep | None":
    """The step the server runs after each prefill, or None when compression is off (the default)."""
    return VLCacheCompression(config) if config.enabled else None
