#!/usr/bin/env bash
# Compression on a live server (dummy 7B) on the GPU host, optionally beside the GPU tests:
#   bash benchmarks/compression_smoke.sh            (repo root, .gpu_bundle carried; ~3 min)
#   WITH_TESTS=1 bash benchmarks/compression_smoke.sh   (benchmarks/gpu_tests.sh while the server starts)
# The server: --enable-vlcache --vlcache-compress-ratio 1.0 (compression on request), Triton decode, no
# overlap schedule, SGLang's strict idle leak check. benchmarks/compression_smoke.py sends alpha 1.0 and
# 0.1 requests and checks the gauges; then the server idles (the leak check runs) and its log is searched.
set -uo pipefail
source benchmarks/gpu_env.sh
export SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1
python3 -m sglang.launch_server "${SERVER_FLAGS[@]}" --enable-vlcache --enable-metrics \
  --decode-attention-backend triton --disable-overlap-schedule --vlcache-compress-ratio 1.0 \
  >"$OUT/server_compress.log" 2>&1 &
SERVER_PID=$!
tests_rc=skipped
if [ "${WITH_TESTS:-0}" = 1 ]; then
  bash benchmarks/gpu_tests.sh; tests_rc=$?
fi
t0=$(date +%s)
until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server died:"; tail -40 "$OUT/server_compress.log"; exit 1; fi
  if (( $(date +%s) - t0 > 240 )); then echo "no health after 240 s"; kill "$SERVER_PID"; exit 1; fi
  sleep 2
done
timeout 180 python3 benchmarks/compression_smoke.py --port "$PORT" --out "$OUT/compression_smoke.json"; rc=$?
sleep 4  # idle: SGLang's strict check runs
echo "leak reports: $(grep -cE 'memory leak detected|KV double free|use-after-free' "$OUT/server_compress.log")"
echo "tracebacks: $(grep -c Traceback "$OUT/server_compress.log")"
grep -m3 -A12 Traceback "$OUT/server_compress.log"
grep -m3 "vlcache" "$OUT/server_compress.log" | cut -c1-300
kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null
echo "gpu tests exit: $tests_rc; smoke exit: $rc"
exit "$rc"
