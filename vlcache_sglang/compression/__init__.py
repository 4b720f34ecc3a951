"""VL-Cache KV compression after prefill (arXiv 2410.23317).

budget.py        gamma_l -> beta_l (sparsity-aware) or alpha everywhere (uniform baseline); kept counts
scores.py        which queries vote (post-vision), s_l(j) and gamma_l per layer (kernels/attention_scores.py)
selection.py     kept positions per layer; the compaction plan: per-layer slot tables, copies, frees
step.py          PostPrefillStep (the seam after prefill), PrefillView, the kv_trimmed flag
decode_tables.py KeptLengthTable: per (row, layer) kept lengths; decode tables (kernels/kept_kv_indices.py)
config.py        CompressionConfig (compress_ratio alpha; off by default)
compressor.py    VLCacheCompression: the step that puts the above together
query_capture.py which Q rows of a prefill batch the step needs, kept layer by layer as the forward runs
runtime.py       one scheduler's compression state: pending captures, trimmed rows, the step's lifecycle
decode_attention.py  SGLang's Triton decode backend over per-layer kept sets
install.py       the hooks above, registered by the plugin's composition root

Modules are imported one by one (no re-exports here): `config.py` is read by the launcher's
argument parsing, which must not import Triton kernels.
"""
