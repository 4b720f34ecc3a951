#!/usr/bin/env bash
# One-command serving benchmark on the GPU host: stock SGLang vs vlcache policies, results in $OUT.
#   bash benchmarks/serving.sh --quick                  # ~5 min: single-1080p, stock + first_k
#   bash benchmarks/serving.sh                          # single-1080p + multi-4k, stock + none + first_k
# Any benchmarks/serving.py flag passes through (--presets, --policies, --num-prompts, ...).
set -uo pipefail
source benchmarks/gpu_env.sh
python3 benchmarks/serving.py --model-path "$MODEL" --results-dir "$OUT" "$@"
