"""VL-Cache KV compression after prefill (arXiv 2410.23317), foundations.

budget.py     gamma_l -> beta_l (sparsity-aware) or alpha everywhere (uniform baseline); kept counts
scores.py     which queries vote (post-vision), s_l(j) and gamma_l per layer (kernels/attention_scores.py)
selection.py  kept positions per layer; the compaction plan: per-layer slot tables, copies, frees
step.py       PostPrefillStep (the seam after prefill), PrefillView, the kv_trimmed flag
decode_tables.py KeptLengthTable: per (row, layer) kept lengths; decode tables (kernels/kept_kv_indices.py)
config.py     CompressionConfig (compress_ratio alpha; off by default)
compressor.py VLCacheCompression: the step that puts the above together
"""

from vlcache_sglang.compression.budget import (kept_counts, layer_sparsity, layers_sparsity, uniform_budgets,
                                               vlcache_budgets)
from vlcache_sglang.compression.compressor import VLCacheCompression, build_post_prefill_step
from vlcache_sglang.compression.config import CompressionConfig
from vlcache_sglang.compression.decode_tables import KeptLengthTable
from vlcache_sglang.compression.scores import LayerScores, post_vision_positions, score_layer, score_request
from vlcache_sglang.compression.selection import (CompressionPlan, apply_compaction, plan_compaction,
                                                  select_kept_positions, select_layers)
from vlcache_sglang.compression.step import (PostPrefillResult, PostPrefillStep, PrefillView, is_kv_trimmed,
                                             mark_kv_trimmed, trimmed_plan)

__all__ = ["kept_counts", "layer_sparsity", "layers_sparsity", "uniform_budgets", "vlcache_budgets", "VLCacheCompression",
           "build_post_prefill_step", "CompressionConfig", "KeptLengthTable", "LayerScores", "post_vision_positions", "score_layer",
           "score_request", "CompressionPlan", "apply_compaction", "plan_compaction", "select_kept_positions",
           "select_layers", "PostPrefillResult", "PostPrefillStep", "PrefillView", "is_kv_trimmed",
           "mark_kv_trimmed", "trimmed_plan"]
