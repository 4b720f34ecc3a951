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
source benchmarks/compression_task.sh
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
stamp "checkpoint"
train_task_checkpoint "$OUT/train.log" | tee -a "$OUT/progress.log"
stamp "simulation ($REQUESTS held-out requests)"
python3 -m benchmarks.tiny_vlm.compression_sim --model "$TASK_CKPT" --requests "$REQUESTS" \
  --out "$OUT/sim.json" ${SIM_ARGS:-} | tee "$OUT/sim.md"
stamp "done"
