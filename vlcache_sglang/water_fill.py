"""Capped proportional allocation (water-filling), shared by the recompute profile's layer ratios
(`layer_profile.layer_ratios`, cap 1) and compression's capped layer budgets (`compression/budget.py`)."""

from __future__ import annotations

import torch


def water_fill(weights: torch.Tensor, total: float, cap: float) -> torch.Tensor:
    """x_l = min(cap, c * w_l), c chosen so that sum x_l = total (every x_l = cap when total >= L * cap);
    weights >= 0, float64. Monotone in w (a larger weight never gets less). Weights that are all zero
    among the uncapped layers share what is left evenly. Each share is w_l / sum(w) first, then scaled:
    a weight 1e-308 of the largest neither underflows nor makes the scale overflow."""
    x = torch.zeros_like(weights)
    free = torch.ones_like(weights, dtype=torch.bool)
    remaining = total
    while bool(free.any()):
        w = weights[free]
        s = float(w.sum())
        if s <= 0.0:
            x[free] = min(cap, remaining / int(free.sum()))
            break
        share = remaining * (w / s)
        over = share > cap
        if not bool(over.any()):
            x[free] = share
            break
        idx = free.nonzero().flatten()[over]
        x[idx] = cap
        free[idx] = False
        remaining -= cap * int(over.sum())
    return x
