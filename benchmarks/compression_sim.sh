#!/usr/bin/env bash
# What compression keeps and loses (issue 13): train the compression task's checkpoint (or keep it,
# REUSE_CKPT=1 on the warm machine) and run benchmarks/tiny_vlm/compression_sim.py on it, on the GPU
# host (repo root, .gpu_bundle carried; MINUTES + ~1 min):
#   bash benchmarks/compression_sim.sh
# The simulation applies the server's budgets and selections per layer in plain torch, teacher forced,
# next to an oracle (the decode queries' own attention) and random tokens at the same counts.
# COMPRESS_TASK, ROW_IMAGES (default 6) and the checkpoint as compression_bench.sh's (compression_task.sh).
# Results in $OUT: sim.json, sim.md, train.log.
set -euo pipefail
t0=$(date +%s)
source benchmarks/gpu_env.sh
MINUTES=${MINUTES:-6}
REQUESTS=${REQUESTS:-256}
ROW_IMAGES=${ROW_IMAGES:-6}
source benchmarks/compression_task.sh
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
if [ "${REUSE_CKPT:-0}" = 1 ] && [ -f "$TASK_CKPT/model.safetensors" ]; then
  stamp "REUSE_CKPT=1: $TASK_CKPT from an earlier run on this machine"
else
  stamp "train ($MINUTES min, ${TASK_VARIANT%%:*})"
  # shellcheck disable=SC2086  # flags are words
  python3 -m benchmarks.tiny_vlm.train --out "$TASK_CKPT" --minutes "$MINUTES" --tokenizer-from "$MODEL" \
    ${TASK_VARIANT#*:} ${TRAIN_ARGS:-} >"$OUT/train.log" 2>&1
  tail -2 "$OUT/train.log"
fi
cp "$TASK_CKPT/train_log.json" "$OUT/" 2>/dev/null || true
stamp "simulation ($REQUESTS held-out requests)"
python3 -m benchmarks.tiny_vlm.compression_sim --model "$TASK_CKPT" --requests "$REQUESTS" \
  --out "$OUT/sim.json" ${SIM_ARGS:-} | tee "$OUT/sim.md"
stamp "done"
