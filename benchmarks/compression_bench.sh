#!/usr/bin/env bash
# Accuracy of VL-Cache KV compression (issue 13) on a tiny Qwen2.5-VL trained on the compression task,
# on the GPU host, one command (repo root, .gpu_bundle carried; ~9 min; REUSE_CKPT=1: ~5 min cold):
#   bash benchmarks/compression_bench.sh
# COMPRESS_TASK (benchmarks/compression_task.sh): counts (default: one 16 x 16 grid, "How many red,
# green, blue and yellow cells are there?" -> "2 0 3 1", regime C, /tmp/tiny-counts) or rows (ROW_IMAGES
# images, default 6, a row question, regime R; those checkpoints never learned rows). train_tiny.sh
# trains the same checkpoint beside the accuracy variants (its EXTRA default): then REUSE_CKPT=1 (and the
# same COMPRESS_TASK) on the warm machine.
# 1. train (MINUTES, 8 layers) on the task, or keep the checkpoint
# 2. make_eval's regime (IMAGES requests, held-out images)
# 3. benchmarks/compression_accuracy.py: stock + a compressing server per budget method (BUDGETS, default
#    vlcache,uniform: the H2O-like baseline; vlcache+sink4 keeps the first 4 prompt tokens too, which
#    gained nothing on the one-image task; vlcache+share0.5 gives every layer half of alpha uniformly,
#    --vlcache-compress-uniform-share), every alpha by per-request override, policy full; alpha 1.0
#    against stock; the answer-prior line says how often the eval set's commonest answer is right (a
#    model no better than it reads nothing from the image). The servers start cold in ~3 min on a fresh
#    machine: give REUSE_CKPT=1 runs BUDGET_S >= 420.
# Results in $OUT: progress.log, train.log, compression/compression.{md,json,png}, server_tails.txt.
set -euo pipefail
t0=$(date +%s)
source benchmarks/gpu_env.sh
MINUTES=${MINUTES:-6}
BUDGET_S=${BUDGET_S:-560}
IMAGES=${IMAGES:-128}
ALPHAS=${ALPHAS:-1.0,0.5,0.2,0.1,0.05}
source benchmarks/compression_task.sh
CKPT=$TASK_CKPT
DATA=/tmp/${TASK_VARIANT%%:*}_eval
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
stamp "checkpoint"
train_task_checkpoint "$OUT/train.log" | tee -a "$OUT/progress.log"
stamp "eval set $TASK_REGIME ($IMAGES requests)"
# shellcheck disable=SC2086  # flags are words
python3 -m benchmarks.tiny_vlm.make_eval --model "$CKPT" --out-dir "$DATA" --regimes "$TASK_REGIME" --images "$IMAGES" \
  $TASK_EVAL_ARGS | tee -a "$OUT/progress.log"
rc=0
left=$(( BUDGET_S - ($(date +%s) - t0) ))
if [ "$left" -lt 300 ]; then
  # A cold stock start alone took 191 s (H200, 2026-12-02); a call killed at its limit leaves servers
  # listening on the ports the next call needs.
  stamp "servers + sweep skipped: $left s of BUDGET_S left; on the warm machine: REUSE_CKPT=1 MINUTES=0"
else
  stamp "servers + sweep"
  # SIGTERM at the budget: the driver stops its servers on the way out.
  timeout -s TERM "$(( left - 10 ))" python3 benchmarks/compression_accuracy.py --dataset "$DATA/$TASK_REGIME.jsonl" \
    --model "$CKPT" --log-dir /tmp/compress_logs --out-dir "$OUT/compression" --alphas "$ALPHAS" \
    --budgets "${BUDGETS:-vlcache,uniform}" --deadline-unix $(( t0 + BUDGET_S - 40 )) >"$OUT/sweep.log" 2>&1 || rc=$?
  [ "$rc" != 0 ] && { stamp "compression_accuracy exit $rc"; tail -30 "$OUT/sweep.log"; }
fi
rm -f "$OUT/pip.log"
stamp "done"
[ -f "$OUT/compression/compression.md" ] && cat "$OUT/compression/compression.md"
exit "$rc"
