#!/usr/bin/env bash
# What compression keeps and loses (issue 13): train the compression task's checkpoint (or keep it,
# REUSE_CKPT=1 on the warm machine) and run benchmarks/tiny_vlm/compression_sim.py on it, on the GPU
# host (repo root, .gpu_bundle carried; MINUTES + ~1 min):
#   bash benchmarks/compression_sim.sh
# The simulation applies the server's budgets and selections per layer in plain torch, teacher forced,
# next to an oracle (the decode queries' own attention) and random tokens at the same counts.
# COMPRESS_TASK, ROW_IMAGES (default 6) and the checkpoint as compression_bench.sh's (compression_task.sh).
# SHARES="0 0.25 0.5" runs one simulation per --vlcache-compress-uniform-share instead of one with
# SIM_ARGS alone (SIM_ARGS still passed to each): a sweep of the share costs no server start.
# Results in $OUT: sim.json, sim.md (SHARES: sims.tar.gz of share_S.json/.md, the tables printed), train.log.
set -euo pipefail
t0=$(date +%s)
source benchmarks/gpu_env.sh
MINUTES=${MINUTES:-6}
REQUESTS=${REQUESTS:-256}
BUDGET_S=${BUDGET_S:-560}  # the shares still to simulate past it are skipped (a killed call returns nothing)
source benchmarks/compression_task.sh
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
stamp "checkpoint"
train_task_checkpoint "$OUT/train.log" | tee -a "$OUT/progress.log"
simulate() {  # PATH [ARGS...]: one simulation, its report in PATH.json and PATH.md, within BUDGET_S
  local path=$1 left; shift
  left=$(( BUDGET_S - ($(date +%s) - t0) ))
  if [ "$left" -lt 30 ]; then stamp "simulation $(basename "$path") skipped: $left s of BUDGET_S left"; return 0; fi
  stamp "simulation $(basename "$path") ($REQUESTS held-out requests) $*"
  # shellcheck disable=SC2086  # SIM_ARGS are words
  timeout -s TERM "$left" python3 -m benchmarks.tiny_vlm.compression_sim --model "$TASK_CKPT" --requests "$REQUESTS" \
    --out "$path.json" ${SIM_ARGS:-} "$@" | tee "$path.md" || stamp "simulation $(basename "$path") stopped at the budget"
}
if [ -z "${SHARES:-}" ]; then
  simulate "$OUT/sim"
else
  # One archive: the device hands back only a few files.
  mkdir -p "$OUT/sims"
  for share in $SHARES; do simulate "$OUT/sims/share_$share" --uniform-share "$share"; done
  tar czf "$OUT/sims.tar.gz" -C "$OUT" sims && rm -r "$OUT/sims"
fi
stamp "done"
