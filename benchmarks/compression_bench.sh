#!/usr/bin/env bash
# Accuracy of VL-Cache KV compression (issue 13) on a tiny Qwen2.5-VL trained to read grid rows out, on
# the GPU host, one command (repo root, .gpu_bundle carried; ~9 min; REUSE_CKPT=1: ~3 min):
#   bash benchmarks/compression_bench.sh
# benchmarks/train_tiny.sh trains the same checkpoint (its EXTRA variant `rows`, /tmp/tiny-rows) beside
# the accuracy variants: then REUSE_CKPT=1 on the warm machine.
# 1. train (MINUTES, 8 layers) on layout b with row questions ("What are the colours of row r, left to
#    right?" after the image: 8 answer tokens, each read from one image token), or keep /tmp/tiny-rows
# 2. make_eval regime R (IMAGES held-out images, each once)
# 3. benchmarks/compression_accuracy.py: stock + a compressing server per budget method (vlcache, uniform:
#    the H2O-like baseline, vlcache+sink4: the first 4 prompt tokens kept too), every alpha by per-request
#    override, policy full; alpha 1.0 against stock. The servers start cold in ~3 min on a fresh machine:
#    give REUSE_CKPT=1 runs BUDGET_S >= 420.
# Results in $OUT: progress.log, train.log, compression/compression.{md,json,png}, server_tails.txt.
set -euo pipefail
t0=$(date +%s)
source benchmarks/gpu_env.sh
MINUTES=${MINUTES:-6}
BUDGET_S=${BUDGET_S:-560}
IMAGES=${IMAGES:-128}
ALPHAS=${ALPHAS:-1.0,0.5,0.2,0.1,0.05}
CKPT=/tmp/tiny-rows
DATA=/tmp/rows_eval
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
quiet() { grep -v -i -e warn -e "loading weights" || true; }
if [ "${REUSE_CKPT:-0}" = 1 ] && [ -f "$CKPT/model.safetensors" ]; then
  stamp "REUSE_CKPT=1: $CKPT from an earlier run on this machine"
else
  stamp "train ($MINUTES min, layout b, row questions)"
  python3 -m benchmarks.tiny_vlm.train --out "$CKPT" --minutes "$MINUTES" --tokenizer-from "$MODEL" --layers 8 \
    --layouts b:1 --kinds-b "row:0.6,cell:0.2,count:0.2" --route-p-ref 0 ${TRAIN_ARGS:-} 2>&1 | quiet \
    | tee "$OUT/train.log" | tail -2
fi
cp "$CKPT/train_log.json" "$OUT/" 2>/dev/null || true
stamp "eval set R ($IMAGES images)"
python3 -m benchmarks.tiny_vlm.make_eval --model "$CKPT" --out-dir "$DATA" --regimes R --images "$IMAGES"
stamp "servers + sweep"
rc=0
python3 benchmarks/compression_accuracy.py --dataset "$DATA/R.jsonl" --model "$CKPT" --log-dir /tmp/rows_logs \
  --out-dir "$OUT/compression" --alphas "$ALPHAS" --deadline-unix $(( t0 + BUDGET_S - 40 )) \
  >"$OUT/sweep.log" 2>&1 || rc=$?
[ "$rc" != 0 ] && { stamp "compression_accuracy exit $rc"; tail -30 "$OUT/sweep.log"; }
rm -f "$OUT/pip.log"
stamp "done"
[ -f "$OUT/compression/compression.md" ] && cat "$OUT/compression/compression.md"
exit "$rc"
