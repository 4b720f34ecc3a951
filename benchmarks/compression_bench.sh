#!/usr/bin/env bash
# Accuracy of VL-Cache KV compression (issue 13) on a tiny Qwen2.5-VL trained to read grid rows out, on
# the GPU host, one command (repo root, .gpu_bundle carried; ~9 min; REUSE_CKPT=1: ~3 min):
#   bash benchmarks/compression_bench.sh
# ROW_IMAGES=K (2..6; default 4, as train_tiny.sh's; 1: the one-image task): K images per request,
# the question after all of them naming one ("What are the colours of row r of image i, left to
# right?"), so image tokens dominate the prompt as
# VL-Cache assumes: m ~ 370 tokens at K = 4 (318..453), ~510 at K = 6, against the 25 after the last
# image that every layer keeps (with one image, m ~ 150 and 21). Checkpoint /tmp/tiny-mrowsK.
# benchmarks/train_tiny.sh trains the same checkpoint (its EXTRA variant: /tmp/tiny-mrows4 by default,
# ROW_IMAGES picks K there too, ROW_IMAGES=1 /tmp/tiny-rows) beside the accuracy variants: then
# REUSE_CKPT=1 (and the same ROW_IMAGES) on the warm machine. Flags of both: benchmarks/row_task.sh.
# 1. train (MINUTES, 8 layers) on row questions ("What are the colours of row r, left to right?" after
#    the image, layout b; with ROW_IMAGES=K layout mrow: 8 answer tokens, each read from one image
#    token), or keep the checkpoint
# 2. make_eval regime R (IMAGES requests, each with ROW_IMAGES held-out images of its own)
# 3. benchmarks/compression_accuracy.py: stock + a compressing server per budget method (BUDGETS, default
#    vlcache,uniform: the H2O-like baseline; vlcache+sink4 keeps the first 4 prompt tokens too, which
#    gained nothing on the one-image task), every alpha by per-request override, policy full; alpha 1.0
#    against stock. The servers start cold in ~3 min on a fresh machine:
#    give REUSE_CKPT=1 runs BUDGET_S >= 420.
# Results in $OUT: progress.log, train.log, compression/compression.{md,json,png}, server_tails.txt.
set -euo pipefail
t0=$(date +%s)
source benchmarks/gpu_env.sh
MINUTES=${MINUTES:-6}
BUDGET_S=${BUDGET_S:-560}
IMAGES=${IMAGES:-128}
ALPHAS=${ALPHAS:-1.0,0.5,0.2,0.1,0.05}
ROW_IMAGES=${ROW_IMAGES:-4}
source benchmarks/row_task.sh
CKPT=$ROW_CKPT
DATA=/tmp/${ROW_VARIANT%%:*}_eval
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
quiet() { grep -v -i -e warn -e "loading weights" || true; }
if [ "${REUSE_CKPT:-0}" = 1 ] && [ -f "$CKPT/model.safetensors" ]; then
  stamp "REUSE_CKPT=1: $CKPT from an earlier run on this machine"
else
  stamp "train ($MINUTES min, row questions, $ROW_IMAGES image(s) per request)"
  # shellcheck disable=SC2086  # flags are words
  python3 -m benchmarks.tiny_vlm.train --out "$CKPT" --minutes "$MINUTES" --tokenizer-from "$MODEL" \
    ${ROW_VARIANT#*:} ${TRAIN_ARGS:-} 2>&1 | quiet | tee "$OUT/train.log" | tail -2
fi
cp "$CKPT/train_log.json" "$OUT/" 2>/dev/null || true
stamp "eval set R ($IMAGES requests, $ROW_IMAGES image(s) each)"
python3 -m benchmarks.tiny_vlm.make_eval --model "$CKPT" --out-dir "$DATA" --regimes R --images "$IMAGES" \
  --row-images "$ROW_IMAGES" | tee -a "$OUT/progress.log"
stamp "servers + sweep"
rc=0
python3 benchmarks/compression_accuracy.py --dataset "$DATA/R.jsonl" --model "$CKPT" --log-dir /tmp/rows_logs \
  --out-dir "$OUT/compression" --alphas "$ALPHAS" --budgets "${BUDGETS:-vlcache,uniform}" --deadline-unix $(( t0 + BUDGET_S - 40 )) \
  >"$OUT/sweep.log" 2>&1 || rc=$?
[ "$rc" != 0 ] && { stamp "compression_accuracy exit $rc"; tail -30 "$OUT/sweep.log"; }
rm -f "$OUT/pip.log"
stamp "done"
[ -f "$OUT/compression/compression.md" ] && cat "$OUT/compression/compression.md"
exit "$rc"
