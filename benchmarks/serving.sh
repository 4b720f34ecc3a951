#!/usr/bin/env bash
# One-command serving benchmark on the GPU host: stock SGLang vs vlcache policies, results in $OUT.
#   bash benchmarks/serving.sh --quick                  # ~5 min: single-1080p, stock + first_k
#   bash benchmarks/serving.sh                          # single-1080p + multi-4k, stock + none + first_k
# Any benchmarks/serving.py flag passes through (--presets, --policies, --num-prompts, ...).
set -uo pipefail
source benchmarks/gpu_env.sh
# exec: `timeout` (or the host) signals this shell's process; without exec bash would die and leave
# the driver and its servers running into the next command.
exec python3 benchmarks/serving.py --model-path "$MODEL" --results-dir "$OUT" "$@"
