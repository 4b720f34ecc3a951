#!/usr/bin/env bash
# GPU check (run on the GPU host from the repo root, with .gpu_bundle carried): check that a bad
# set-up is refused, start stock SGLang and SGLang --enable-vlcache in turn, send image chat
# requests to each, run the GPU tests, and print a short table last. Full logs go to $OUT.
#
# Prepare on the CPU machine first (once per session):
#   bash ../shared/gpu/make_bundle.sh .gpu_bundle && bash benchmarks/pack_model.sh .gpu_bundle
set -uo pipefail
source benchmarks/gpu_env.sh
# PARALLEL_FLAGS="--tp-size 2" (several GPUs): every server gets them, stock too; the vlcache servers
# also --vlcache-experimental-parallel, without which vlcache refuses TP / DP.
read -ra PARALLEL <<<"${PARALLEL_FLAGS:-}"
SERVER_FLAGS+=("${PARALLEL[@]}")
VL_PARALLEL=()
[ ${#PARALLEL[@]} -gt 0 ] && VL_PARALLEL=(--vlcache-experimental-parallel)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

echo "== a refused set-up (fa3 backend) must fail at start-up, naming the problem"
timeout 120 python3 -m sglang.launch_server "${SERVER_FLAGS[@]}" --enable-vlcache --attention-backend fa3 \
  >"$OUT/refused.log" 2>&1
refused_rc=$?
refused_msg=$(grep -o "enable-vlcache needs --attention-backend[^.]*" "$OUT/refused.log" | head -1)

# vlcache: the default set-up; chunked: policy full with 1024-token prefill chunks, so a reused image
# spans chunk boundaries and every reused token is recomputed at layer 0 (the rotation check compares
# the copied-and-rotated layer-0 K with the fresh one: VLCACHE_CHECK_ROTATION logs max |diff|).
export VLCACHE_CHECK_ROTATION=1
for label in stock vlcache chunked; do
  echo "== $label"
  extra=()
  [ "$label" = vlcache ] && extra=(--enable-vlcache --vlcache-policy first_k "${VL_PARALLEL[@]}")
  [ "$label" = chunked ] && extra=(--enable-vlcache --vlcache-policy full --chunked-prefill-size 1024 "${VL_PARALLEL[@]}")
  start_server "$label" "${extra[@]}" || continue
  python3 benchmarks/gpu_client.py --port "$PORT" --label "$label" --out "$OUT/probes.jsonl"
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && echo "$label: healthy after probes" || echo "$label: NOT healthy"
  grep -h "rotation check" "$OUT/server_$label.log" | sed 's/.*vlcache rotation check/rotation check/' \
    | tee "$OUT/rotation_$label.txt" | tail -3
  stop_server
done
unset VLCACHE_CHECK_ROTATION

echo "== memory pressure: distinct 4K images through a small KV pool, strict idle leak check"
export SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1  # a leak at idle raises in the scheduler
start_server pressure --enable-vlcache --vlcache-policy first_k "${VL_PARALLEL[@]}" \
  --max-total-tokens 40000 --vlcache-mm-store-tokens 25000 --enable-metrics && {
  python3 benchmarks/gpu_client.py --port "$PORT" --label pressure --out "$OUT/probes.jsonl" --pressure 5
  sleep 3  # let the scheduler go idle and run its leak check
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && echo "pressure: healthy after the stream" || echo "pressure: NOT healthy"
  curl -s "http://127.0.0.1:$PORT/metrics" | grep -E "^sglang:vlcache_(key_hits|key_misses|stored_images|evicted_images|store_tokens|store_skipped)[ {]" | tee "$OUT/pressure_metrics.txt"
  stop_server
  # SGLang's idle invariant messages (a bare "leak" also matches torch's NCCL shutdown warning).
  grep -cE "memory leak detected|KV double free|use-after-free" "$OUT/server_pressure.log" \
    | sed 's/^/pressure: SGLang leak reports in the log: /'
}
unset SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE

# GPU_TESTS=0: servers only (the tests on their own: bash benchmarks/gpu_tests.sh).
if [ "${GPU_TESTS:-1}" != 0 ]; then
  echo "== GPU tests"
  bash benchmarks/gpu_tests.sh
else
  echo "GPU_TESTS=0: no GPU tests this run" >"$OUT/pytest.log"
fi

echo
echo "== summary ($(cat "$OUT/gpu.txt"), $(date -u +%F))"
echo "refused set-up: exit $refused_rc, \"$refused_msg\""
python3 - "$OUT/probes.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
stock = {r["probe"]: r.get("text") for r in rows if r["server"] == "stock"}
print(f"| {'server':8} | {'probe':30} | status | latency s | prompt | cached | = stock | output")
print("|" + "---|" * 8)
for r in rows:
    same = "" if r["probe"] not in stock or r["server"] == "stock" else ("yes" if r.get("text") == stock[r["probe"]] else "NO")
    print(f"| {r['server']:8} | {r['probe']:30} | {r['status']} | {r['latency_s']} | {r.get('prompt_tokens')} "
          f"| {r.get('cached_tokens')} | {same} | {r.get('text', r.get('error', ''))[:40]!r}")
PY
for f in "$OUT"/rotation_*.txt; do echo "$(basename "$f" .txt): $(wc -l <"$f") checks, worst: $(grep -o 'max |rotated - fresh| = [0-9.e+-]*' "$f" | sort -t= -k2 -g | tail -1)"; done
tail -1 "$OUT/pytest.log"
# The device tool returns at most 8 files from $OUT: the logs travel as one archive.
tar czf "$OUT/logs.tar.gz" -C "$OUT" $(cd "$OUT" && ls server_*.log rotation_*.txt refused.log pytest.log pip.log 2>/dev/null) \
  && (cd "$OUT" && rm -f server_*.log rotation_*.txt refused.log pytest.log pip.log)
