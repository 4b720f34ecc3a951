#!/usr/bin/env bash
# Reuse check on the GPU host (repo root, .gpu_bundle carried): stock SGLang, then our server with
# policies full / none / first_k, the same probes against each; prints the comparison table last.
#   POLICIES="full none first_k" bash benchmarks/reuse_check.sh
# LABELS replaces the whole list; POLICY:eager runs that policy without our CUDA graphs, so
#   LABELS="first_k first_k:eager" BASELINE=first_k:eager bash benchmarks/reuse_check.sh
# checks that graph replays generate what the eager loop generates.
set -uo pipefail
source benchmarks/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
rm -f "$OUT/reuse.jsonl" "$OUT/breakdown.md"
for label in ${LABELS:-stock ${POLICIES:-full none first_k}}; do
  extra=(); [ "$label" != stock ] && extra=(--enable-vlcache --vlcache-policy "${label%%:*}")
  if [ "${label#*:}" = eager ]; then export VLCACHE_CUDA_GRAPH=0; else unset VLCACHE_CUDA_GRAPH; fi
  start_server "$label" "${extra[@]}" || continue
  python3 benchmarks/reuse_check.py probe --port "$PORT" --label "$label" --out "$OUT/reuse.jsonl"
  (cd benchmarks && python3 ttft_breakdown.py --port "$PORT" --label "$label") >>"$OUT/breakdown.md"
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || echo "$label: NOT healthy after probes"
  grep -E "vlcache stats|CUDA graphs|Traceback|Error" "$OUT/server_$label.log" | tail -5 | cut -c1-300
  stop_server
done
echo "== $(cat "$OUT/gpu.txt"), $(date -u +%F)"
python3 benchmarks/reuse_check.py compare "$OUT/reuse.jsonl" --baseline "${BASELINE:-stock}"
echo; grep -v "^|---\|^| server" "$OUT/breakdown.md"
