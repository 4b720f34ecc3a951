#!/usr/bin/env bash
# Accuracy of vlcache's reuse policies on a small Qwen2.5-VL trained here, on the GPU host:
#   bash benchmarks/accuracy_bench.sh            (repo root, .gpu_bundle carried; QUICK=1: shorter)
# 1. train benchmarks/tiny_vlm (grid task; answers depend on the image and the question before it)
# 2. plain-torch reuse check of the checkpoint (reuse_sim: full vs spliced image KV)
# 3. eval set: held-out images, each asked several times after different text
# 4. stock + vlcache full/none/first_k servers side by side, accuracy.py against all (reference: full)
# Results in $OUT: train.log, reuse_sim.json, accuracy/accuracy.{json,md}, server_tails.txt.
set -euo pipefail
source benchmarks/gpu_env.sh  # OUT, PYTHONPATH; unpacks the dummy 7B directory (our tokenizer source)
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  MINUTES=${MINUTES:-1.5}; IMAGES=24; REPEATS=4; PAIRS=256; FIRST_K=2,8,32
else
  MINUTES=${MINUTES:-3}; IMAGES=64; REPEATS=5; PAIRS=1024; FIRST_K=2,4,8,16,32
fi
CKPT=/tmp/tiny-qwen2.5-vl
EVAL=/tmp/tiny_eval.jsonl
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
quiet() { grep -v -i -e warn -e "loading weights" || true; }  # library chatter; never fails the pipe

stamp "train ($MINUTES min)"
python3 -m benchmarks.tiny_vlm.train --out "$CKPT" --minutes "$MINUTES" --tokenizer-from "$MODEL" \
  ${TRAIN_ARGS:-} 2>&1 | quiet | tee "$OUT/train.log" | tail -4

stamp "reuse_sim (plain torch)"
python3 -m benchmarks.tiny_vlm.reuse_sim --model "$CKPT" --pairs "$PAIRS" --first-k "$FIRST_K" \
  --out "$OUT/reuse_sim.json" 2>&1 | quiet

stamp "eval set"
python3 -m benchmarks.tiny_vlm.make_eval --model "$CKPT" --out "$EVAL" --images "$IMAGES" --repeats "$REPEATS"

stamp "servers + accuracy.py"
python3 -m benchmarks.tiny_vlm.serve_eval --model "$CKPT" --dataset "$EVAL" --out-dir "$OUT/accuracy" \
  --log-dir /tmp/tiny_server_logs --first-k "$FIRST_K" --tails-to "$OUT/server_tails.txt" \
  | tail -40
stamp "done"
