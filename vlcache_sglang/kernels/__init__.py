"""CUDA kernels (Triton) of vlcache-sglang, each with a torch reference beside it."""

from vlcache_sglang.kernels.attention_scores import post_vision_scores
from vlcache_sglang.kernels.attention_scores_reference import post_vision_scores_reference
from vlcache_sglang.kernels.kept_kv_indices import kept_kv_indices, kept_kv_lens
from vlcache_sglang.kernels.kept_kv_indices_reference import kept_kv_indices_reference
from vlcache_sglang.kernels.copy_rotate import copy_rotate_kv, copy_rotate_pool_kv
from vlcache_sglang.kernels.copy_rotate_reference import copy_rotate_kv_reference, rotate_neox
from vlcache_sglang.kernels.scattered_attention import ScatteredAttention
from vlcache_sglang.kernels.scattered_attention_reference import scattered_attention_reference

__all__ = ["copy_rotate_kv", "copy_rotate_pool_kv", "copy_rotate_kv_reference", "rotate_neox",
           "ScatteredAttention", "scattered_attention_reference", "post_vision_scores",
           "post_vision_scores_reference", "kept_kv_indices", "kept_kv_lens", "kept_kv_indices_reference"]
