"""Per-layer KV budgets: VL-Cache's sparsity-aware allocation and the uniform (H2O-like) baseline.

VL-Cache (Tu et al., arXiv 2410.23317) measures, after the prefill, how concentrated each layer's
post-vision attention A'_l = softmax(Q_post K^T / sqrt(d)) (causal) is, and gives dense layers more
of the cache than sparse ones:

    gamma_l = mean over heads h and post-vision queries i of
              |{j <= p_i : A'_l[h, i, j] < t * max_j' A'_l[h, i, j']}| / (p_i + 1)      (t = 1 %)
    beta_l  = clip(alpha * L * (1 - gamma_l) / sum_j (1 - gamma_j), 0.01, 1)
    kept_l  = floor(beta_l * m)                                                          (m prompt tokens)

Before clipping the mean of beta_l is alpha (the global keep ratio); alpha = 1 is special-cased to
beta_l = 1 (no compression). The clip follows the paper
and is not rebalanced: a layer clipped at 1 keeps everything, so the mean may fall below alpha.

A cap beta_max < 1 (`max_budget`, ours, off by default) bounds every layer's budget: the slots a
request gives back are its m - max_l kept_l own tokens (selection.py), so one dense layer clipped at 1
would free nothing. Under a cap the budget above it is handed to the uncapped layers in proportion
to their density (water-filling), so the mean stays alpha whenever alpha <= beta_max.
A uniform share s in [0, 1] (`uniform_share`, ours, 0 by default) mixes the two allocations,
beta_l = s * alpha + (1 - s) * beta_l(VL-Cache) before the clip, so every layer keeps at least s * alpha
and the mean stays alpha: on the tiny present tasks the paper's budgets starved sparse layers and
lost answers uniform kept (H200, 2026-12-02: 0.617 against 0.977 at alpha 0.1), on counts (CPU
simulation) they beat uniform; the share is the knob between them.
The sparse counts come from `scores.attention_scores` (pass 2 of the kernel), never from a
materialised attention matrix.
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from vlcache_sglang.water_fill import water_fill

MIN_BUDGET = 0.01  # beta_l's lower clip (the paper's)
SPARSITY_THRESHOLD = 0.01  # t: an entry is sparse below this fraction of its row's maximum

Floats = Union[Sequence[float], torch.Tensor]


def _check_ratio(alpha: float) -> None:
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"keep ratio alpha must lie in (0, 1], got {alpha} (1.0 keeps every token)")


def layer_sparsity(sparse_counts: torch.Tensor, query_positions: torch.Tensor) -> float:
    """gamma_l of one layer from the kernel's per-row sparse-entry counts.

    sparse_counts:   [tau, num_qo_heads] int, entries of row (i, h) below t x the row max
    query_positions: [tau] int, position p_i of post-vision query i; its row has p_i + 1 valid entries
    Each row's fraction counts equally (the mean over heads and queries); returns a float in [0, 1).
    """
    return layers_sparsity([sparse_counts], query_positions)[0]


def layers_sparsity(sparse_counts: Sequence[torch.Tensor], query_positions: torch.Tensor) -> list[float]:
    """layer_sparsity of every layer, read back to the host once (the counts may live on the GPU)."""
    for counts in sparse_counts:
        if counts.dim() != 2 or query_positions.shape != counts.shape[:1]:
            raise ValueError(f"sparse_counts must be [tau, heads] and query_positions [tau], got "
                             f"{tuple(counts.shape)} and {tuple(query_positions.shape)}")
    if query_positions.numel() == 0 or not sparse_counts or sparse_counts[0].shape[1] == 0:
        raise ValueError("no post-vision queries: gamma_l is undefined (score at least the last prompt token)")
    valid = (query_positions.to(device=sparse_counts[0].device, dtype=torch.float64) + 1.0)[:, None]
    return torch.stack([(counts.to(torch.float64) / valid).mean() for counts in sparse_counts]).tolist()


def vlcache_budgets(sparsity: Floats, alpha: float, min_budget: float = MIN_BUDGET,
                    max_budget: float = 1.0, uniform_share: float = 0.0) -> torch.Tensor:
    """beta_l = clip(alpha * L * (1 - gamma_l) / sum_j (1 - gamma_j), min_budget, 1); [L] float64.

    sparsity: [L] gamma_l in [0, 1]. A layer whose post-vision attention is denser gets more budget.
    alpha = 1 keeps every token at every layer: the formula itself would still move budget from
    sparse layers to dense ones clipped at 1 (mean below 1), but alpha = 1.0 is the no-compression
    anchor (token-for-token equal to the uncompressed server). max_budget < 1: every beta_l <= it,
    the excess water-filled over the other layers; uniform_share s: s * alpha of every layer's budget
    is uniform (module docstring).
    """
    _check_ratio(alpha)
    if not (0.0 < max_budget <= 1.0) or max_budget < min_budget:
        raise ValueError(f"max_budget must lie in [min_budget {min_budget}, 1], got {max_budget}")
    if not 0.0 <= uniform_share <= 1.0:
        raise ValueError(f"uniform_share must lie in [0, 1] (0: the paper's budgets, 1: uniform), got {uniform_share}")
    gamma = torch.as_tensor(sparsity, dtype=torch.float64).flatten()
    if gamma.numel() == 0:
        raise ValueError("need the sparsity of at least one layer")
    if not bool(((gamma >= 0) & (gamma <= 1)).all()):
        raise ValueError(f"sparsity gamma_l must lie in [0, 1], got {gamma.tolist()}")
    if alpha >= 1.0:
        return torch.ones_like(gamma)
    density = 1.0 - gamma
    total = float(density.sum())
    if total <= 0.0:
        # Impossible from real counts (a row's maximum is never below t x itself); fall back to uniform.
        return uniform_budgets(gamma.numel(), alpha, min_budget, max_budget)
    # Weights: each layer's density with the uniform share mixed in at the mean density (the sum, total, is unchanged).
    density = uniform_share * total / gamma.numel() + (1.0 - uniform_share) * density
    if max_budget >= 1.0:
        return (alpha * gamma.numel() * density / total).clamp(min_budget, 1.0)
    return water_fill(density, alpha * gamma.numel(), max_budget).clamp(min_budget, max_budget)


def layer_budgets(method: str, sparsity: Floats, alpha: float, max_budget: float = 1.0,
                  uniform_share: float = 0.0) -> torch.Tensor:
    """beta_l of a budget method (`CompressionConfig.budget`): "vlcache" (sparsity-aware, with its
    uniform share) or "uniform" (the baseline); [L] float64. One place for the server's step and the
    simulation."""
    if method == "vlcache":
        return vlcache_budgets(sparsity, alpha, max_budget=max_budget, uniform_share=uniform_share)
    if method == "uniform":
        return uniform_budgets(len(sparsity), alpha, max_budget=max_budget)
    raise ValueError(f"budget method {method!r} is unknown; choose vlcache or uniform")


def uniform_budgets(num_layers: int, alpha: float, min_budget: float = MIN_BUDGET,
                    max_budget: float = 1.0) -> torch.Tensor:
    """The baseline at equal alpha: beta_l = alpha at every layer (H2O-like top-k per layer), at most
    max_budget; [L] float64."""
    _check_ratio(alpha)
    if num_layers <= 0:
        raise ValueError(f"num_layers must be > 0, got {num_layers}")
    return torch.full((num_layers,), min(max(alpha, min_budget), max_budget), dtype=torch.float64)


def kept_counts(budgets: Floats, num_prompt_tokens: int, min_keep: int = 0) -> list[int]:
    """Tokens layer l keeps of the m prompt tokens: max(floor(beta_l * m), min(min_keep, m)).

    min_keep: tokens every layer keeps whatever its budget (the post-vision queries and the recent
    window that `selection` always protects), so the window is part of the count, not extra.
    beta = 1 keeps all m exactly (the alpha = 1.0 anchor: no compression).
    """
    if num_prompt_tokens < 0 or min_keep < 0:
        raise ValueError(f"num_prompt_tokens and min_keep must be >= 0, got {num_prompt_tokens}, {min_keep}")
    beta = torch.as_tensor(budgets, dtype=torch.float64).flatten().tolist()
    if any(not (0.0 <= b <= 1.0) for b in beta):
        raise ValueError(f"budgets must lie in [0, 1], got {beta}")
    floor_keep = min(min_keep, num_prompt_tokens)
    # A tiny epsilon so that beta * m landing a rounding error below an integer is not cut by one.
    return [max(min(math.floor(b * num_prompt_tokens + 1e-9), num_prompt_tokens), floor_keep) for b in beta]
