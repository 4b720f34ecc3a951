"""VL-Cache KV compression after prefill (foundations): budgets, scores, selection, the seam."""
