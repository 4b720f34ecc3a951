"""CompressionConfig: the options of VL-Cache KV compression, validated once.

The server's enter through `VLCacheConfig` (`--vlcache-compress-ratio`, `--vlcache-compress-budget`,
`--vlcache-compress-recent-window`; `VLCacheConfig.compression`), a request's alpha through
`PolicyResolver.compression_for` (`custom_params.vlcache.compress_ratio`), which replaces the field
with `with_overrides`. Kept free of heavy imports: the launcher's argument parsing reads it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

BUDGET_METHODS = ("vlcache", "uniform")


@dataclass(frozen=True)
class CompressionConfig:
    # alpha, the share of prompt KV kept (mean over layers); None: compression off (the default).
    compress_ratio: Optional[float] = None
    # "vlcache": sparsity-aware beta_l; "uniform": beta_l = alpha (the H2O-like baseline).
    budget: str = "vlcache"
    recent_window: int = 0  # last prompt tokens every layer keeps besides the post-vision queries
    # First prompt tokens every layer keeps (attention sinks, as StreamingLLM keeps them): 0 is
    # VL-Cache's own rule. On the tiny row task's ~150-token prompts, budgets that kept only the voting
    # tail answered right and then did not stop (H200, 2026-12-01); keeping 4 sinks changed nothing.
    sink_tokens: int = 0
    # beta_max: no layer keeps more than this share of the request's own prompt tokens (budget.py), so
    # that at least 1 - beta_max of them go back to the pool; 1.0 is the paper's budget.
    max_budget: float = 1.0
    # s: every layer's budget is s * alpha uniform plus (1 - s) of VL-Cache's sparsity-aware share
    # (budget "vlcache" only; 0 is the paper's budget, 1 is uniform).
    uniform_share: float = 0.0
    sparsity_threshold: float = 0.01  # an entry is sparse below this share of its row's maximum
    fallback_queries: int = 32  # queries that vote when no text follows the last image
    max_queries: Optional[int] = None  # cap on the voting queries (scoring costs tau x m per layer)

    def __post_init__(self) -> None:
        alpha = self.compress_ratio
        if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))
                                  or not math.isfinite(alpha) or not 0 < alpha <= 1):
            raise ValueError(f"compress_ratio must lie in (0, 1] (1.0 keeps every token; omit it to turn "
                             f"compression off), got {alpha!r}")
        if self.budget not in BUDGET_METHODS:
            raise ValueError(f"budget {self.budget!r} is unknown; choose one of {BUDGET_METHODS}")
        if not 0.01 <= self.max_budget <= 1:
            raise ValueError(f"max_budget must lie in [0.01, 1] (1.0: uncapped, the paper's), got {self.max_budget}")
        if not 0 <= self.uniform_share <= 1:
            raise ValueError(f"uniform_share must lie in [0, 1] (0: the paper's budget, 1: uniform), got "
                             f"{self.uniform_share}")
        if self.recent_window < 0:
            raise ValueError(f"recent_window must be >= 0, got {self.recent_window}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")
        if not 0 < self.sparsity_threshold < 1:
            raise ValueError(f"sparsity_threshold must lie in (0, 1), got {self.sparsity_threshold}")
        if self.fallback_queries < 1:
            raise ValueError(f"fallback_queries must be >= 1, got {self.fallback_queries}")
        if self.max_queries is not None and self.max_queries < 1:
            raise ValueError(f"max_queries must be >= 1 or None, got {self.max_queries}")

    @property
    def enabled(self) -> bool:
        return self.compress_ratio is not None

    def with_overrides(self, **fields: Any) -> "CompressionConfig":
        """A copy with some fields replaced (validated again); unknown names are refused."""
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown compression option(s) {unknown}; choose from {sorted(known)}")
        return dataclasses.replace(self, **fields)
