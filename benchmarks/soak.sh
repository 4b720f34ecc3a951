#!/usr/bin/env bash
# Soak of a vlcache `full` server against stock SGLang on the trained tiny Qwen2.5-VL, on the GPU host,
# one command (repo root, .gpu_bundle carried; ~8.5 min: the stream runs until BUDGET_S - 40 s, so
# REUSE_CKPT=1 gives a longer stream, not a shorter run):
#   bash benchmarks/soak.sh
# 1. train benchmarks/tiny_vlm for MINUTES (default 1.5: a 2.5-min run once diverged to NaN), or keep
#    the last run's checkpoint (REUSE_CKPT=1)
# 2. small eval sets (A, B, multi; held-out images, each asked several times after different text)
# 3. benchmarks/soak.py: a stock server and a vlcache server (--vlcache-policy full, an image store of
#    STORE_IMAGES images so it evicts, SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1), a salt probe, then
#    a mixed concurrent stream until the deadline (salts, repeats, n 2, hostile inputs, client aborts,
#    /flush_cache idle and under load; /health polled), every vlcache answer compared with stock's
# Results in $OUT: progress.log, train.seed0.log, soak/soak.{md,json}, soak/server_tails.txt, soak.log. The
# short table comes last; the exit status is 0 only if every check passed.
# Knobs: MINUTES, BUDGET_S (whole script, default 520), REUSE_CKPT=1, IMAGES, REPEATS, STORE_IMAGES,
# CONCURRENCY, SOAK_ARGS (more soak.py options).
set -euo pipefail
t0=$(date +%s)
source benchmarks/gpu_env.sh  # OUT, PYTHONPATH; unpacks the dummy 7B directory (our tokenizer source)
MINUTES=${MINUTES:-1.5}
BUDGET_S=${BUDGET_S:-520}
IMAGES=${IMAGES:-16}
REPEATS=${REPEATS:-4}
STORE_IMAGES=${STORE_IMAGES:-6}
CONCURRENCY=${CONCURRENCY:-16}
CKPT=/tmp/tiny-qwen2.5-vl
DATA=/tmp/soak_eval
LOGS=/tmp/soak_server_logs
# No step of the stream starts after this (but it runs >= 45 s); ~40 s stay for the idle check, stopping
# the servers and the tables.
DEADLINE=$(( t0 + BUDGET_S - 40 ))
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
quiet() { grep -v -i -e warn -e "loading weights" || true; }
export SGLANG_ENABLE_STRICT_MEM_CHECK_DURING_IDLE=1
stamp "start (budget $BUDGET_S s)"

if [ "${REUSE_CKPT:-0}" = 1 ] && [ -f "$CKPT/model.safetensors" ] && [ -f "$CKPT/train_log.json" ]; then
  stamp "REUSE_CKPT=1: the checkpoint in $CKPT from an earlier run on this machine, no training"
else
  train() {  # a loss that goes NaN stops train.py with an error and no checkpoint
    python3 -m benchmarks.tiny_vlm.train --out "$CKPT" --minutes "$MINUTES" --tokenizer-from "$MODEL" \
      --layouts a:0.45,b:0.3,multi:0.25 --seed "$1" 2>&1 | quiet | tee "$OUT/train.seed$1.log" | tail -3
  }
  stamp "train ($MINUTES min)"
  if ! train 0; then
    stamp "training failed (train.seed0.log); once more with another seed (the stream gets shorter)"
    train 1
  fi
fi
cp "$CKPT/train_log.json" "$OUT/" 2>/dev/null || true

stamp "eval sets"
rm -rf "$DATA" "$LOGS"
python3 -m benchmarks.tiny_vlm.make_eval --model "$CKPT" --out-dir "$DATA" --regimes A,B,multi \
  --images "$IMAGES" --repeats "$REPEATS" --multi-requests "$IMAGES"

stamp "servers (stock, vlcache full) + soak until $(( DEADLINE - t0 )) s"
rc=0
python3 -m benchmarks.soak --model "$CKPT" --data-dir "$DATA" --sets A,B,multi --out-dir "$OUT/soak" \
  --log-dir "$LOGS" --store-images "$STORE_IMAGES" --concurrency "$CONCURRENCY" \
  --deadline-unix "$DEADLINE" --stream-s 600 --progress "$OUT/progress.log" ${SOAK_ARGS:-} \
  >"$OUT/soak.log" 2>&1 || rc=$?
# Leak reports and tracebacks stay in the full logs; keep them when the run failed.
if [ "$rc" != 0 ]; then
  mkdir -p "$OUT/soak"
  for f in "$LOGS"/server_*.log; do [ -f "$f" ] && tail -c 2000000 "$f" >"$OUT/soak/$(basename "$f")"; done
  stamp "soak.py exit $rc; soak.log ends:"
  tail -40 "$OUT/soak.log"
fi
stamp "done"
[ -f "$OUT/soak/soak.md" ] && sed -n '/^## Summary/,$p' "$OUT/soak/soak.md"
exit "$rc"
