#!/usr/bin/env bash
# Speed and capacity of VL-Cache KV compression (issue 13) on the dummy 7B, stock SGLang in the same run,
# on the GPU host, one command (repo root, .gpu_bundle carried; ~8-9 min, stops by BUDGET_S):
#   bash benchmarks/compression_speed.sh
# benchmarks/compression_speed.py: stock, then a vlcache server at --vlcache-compress-ratio ALPHA whose
# every run is made at ALPHA and at 1.0 (per-request override); 4x4K and 1080p, 256 output tokens,
# concurrency 1 and 16; then CAPACITY 4x4K requests at once at ALPHA and 1.0 (peak #running-req).
# Results in $OUT: compression_speed.{md,json,png}, compression_speed.log (the driver's output),
# details.tar.gz (bench JSON, bench and server logs). The short table comes last.
# Knobs: BUDGET_S (whole script, default 540), ALPHA (0.1), CAPACITY (40 requests; 0: none),
# SPEED_ARGS (more compression_speed.py options, e.g. "--presets multi-4k --concurrency 1"; "--stock-default-decode"
# adds stock with SGLang's own FlashInfer decode and overlap scheduling, the speed users get uncompressed).
set -uo pipefail
t0=$(date +%s)
BUDGET_S=${BUDGET_S:-540}
source benchmarks/gpu_env.sh  # OUT, MODEL, PYTHONPATH; installs this package into the bundle's site
RUN=/tmp/cspeed_run
WORK=/tmp/cspeed_work
rm -rf "$RUN" && mkdir -p "$RUN"
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$RUN/gpu.txt" || true
left=$(( BUDGET_S - ($(date +%s) - t0) ))
rc=0
# SIGTERM at the limit: the driver stops its server on the way out. No phase starts in the last 60 s
# (stopping a server takes ~20 s, the report and the tar a few more).
timeout -s TERM "$(( left - 10 ))" python3 benchmarks/compression_speed.py --model-path "$MODEL" \
  --out-dir "$RUN" --work-dir "$WORK" --alpha "${ALPHA:-0.1}" --capacity-requests "${CAPACITY:-40}" \
  --deadline-unix "$(( t0 + BUDGET_S - 60 ))" ${SPEED_ARGS:-} >"$OUT/compression_speed.log" 2>&1 || rc=$?
for f in compression_speed.md compression_speed.json compression_speed.png; do
  [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"
done
# Not the workload JSONL (inline 4K images, tens of MB) nor bench_serving's per-request details.
tar -C /tmp -czf "$OUT/details.tar.gz" --exclude='*.jsonl' "$(basename "$RUN")" "$(basename "$WORK")" || true
rm -f "$OUT/pip.log"
echo "compression_speed.py exit $rc after $(( $(date +%s) - t0 )) s; log tail:"
grep -v "^|" "$OUT/compression_speed.log" | tail -12
[ -f "$OUT/compression_speed.md" ] && { echo; sed -n '/^## Speed/,$p' "$OUT/compression_speed.md" | grep -v "^Decode tok/s per request"; }
exit "$rc"
