#!/usr/bin/env bash
# GPU check (run on the GPU host from the repo root, with .gpu_bundle carried):
#   unpack the SGLang bundle and the model directory, install this package, check that a bad
#   set-up is refused, start stock SGLang and SGLang --enable-vlcache in turn, send image chat
#   requests to each, run the GPU tests, and print a short table last. Full logs go to $OUT.
#
# Prepare on the CPU machine first (once per session):
#   bash ../shared/gpu/make_bundle.sh .gpu_bundle && bash benchmarks/pack_model.sh .gpu_bundle
set -uo pipefail
OUT=${OUT:-/tmp/vlcache_out}
mkdir -p "$OUT"
ROOT=$(pwd)
SITE=/tmp/site
MODEL=/tmp/Qwen2.5-VL-7B-Instruct
PORT=30000
export PYTHONUNBUFFERED=1

echo "== unpack bundle and model"
mkdir -p "$SITE" && tar -C "$SITE" -xJf .gpu_bundle/site.tar.xz || exit 1
tar -C /tmp -xJf .gpu_bundle/model.tar.xz || exit 1
# Install our package (with its entry point) into the bundle's site dir; nothing is fetched.
python3 -m pip install -q --no-deps --no-index --no-build-isolation --target "$SITE" "$ROOT" >"$OUT/pip.log" 2>&1 \
  || { cat "$OUT/pip.log"; exit 1; }
export PYTHONPATH="$SITE"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

SERVER_FLAGS=(--model-path "$MODEL" --load-format dummy --attention-backend flashinfer
  --mm-attention-backend triton_attn --grammar-backend none --mem-fraction-static 0.7 --port $PORT
  --enable-cache-report)

echo "== a refused set-up (fa3 backend) must fail at start-up, naming the problem"
timeout 120 python3 -m sglang.launch_server "${SERVER_FLAGS[@]}" --enable-vlcache --attention-backend fa3 \
  >"$OUT/refused.log" 2>&1
refused_rc=$?
refused_msg=$(grep -o "enable-vlcache needs --attention-backend[^.]*" "$OUT/refused.log" | head -1)

serve() {  # label, extra flags...
  local label=$1; shift
  python3 -m sglang.launch_server "${SERVER_FLAGS[@]}" "$@" >"$OUT/server_$label.log" 2>&1 &
  local pid=$!
  local t0=$(date +%s)
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    if ! kill -0 $pid 2>/dev/null; then echo "server $label died"; tail -30 "$OUT/server_$label.log"; return 1; fi
    if (( $(date +%s) - t0 > 300 )); then echo "server $label: no health after 300 s"; kill $pid; return 1; fi
    sleep 2
  done
  echo "server $label healthy after $(( $(date +%s) - t0 )) s"
  python3 benchmarks/gpu_client.py --port $PORT --label "$label" --out "$OUT/probes.jsonl"
  curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && echo "$label: healthy after probes" || echo "$label: NOT healthy after probes"
  kill $pid; wait $pid 2>/dev/null
  grep -m3 -E "vlcache (enabled|tree cache)" "$OUT/server_$label.log" | cut -c1-200
  return 0
}

echo "== stock SGLang 0.5.16"
serve stock
echo "== SGLang --enable-vlcache"
serve vlcache --enable-vlcache --vlcache-policy first_k

echo "== GPU tests"
VLCACHE_TEST_MODEL_DIR=$MODEL python3 -m pytest -q -p no:cacheprovider tests/kernels tests/test_recompute_policy.py \
  tests/test_image_key.py 2>&1 | tee "$OUT/pytest.log" | tail -5

echo
echo "== summary ($(cat "$OUT/gpu.txt"), $(date -u +%F))"
echo "refused set-up: exit $refused_rc, \"$refused_msg\""
python3 - "$OUT/probes.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
print(f"| {'server':8} | {'probe':24} | status | latency s | prompt | cached | output")
print("|" + "---|" * 7)
for r in rows:
    print(f"| {r['server']:8} | {r['probe']:24} | {r['status']} | {r['latency_s']} | {r.get('prompt_tokens')} "
          f"| {r.get('cached_tokens')} | {r.get('text', r.get('error', ''))[:40]!r}")
PY
tail -1 "$OUT/pytest.log"
