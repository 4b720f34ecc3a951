#!/usr/bin/env bash
# Accuracy of vlcache's recompute policies on a small Qwen2.5-VL trained here, on the GPU host, one command:
#   bash benchmarks/accuracy_bench.sh            (repo root, .gpu_bundle carried; ~9.5 min; QUICK=1: ~5.5 min)
# A model good enough to rank the policies takes longer to train than one call leaves for the sweep: train
# first, then sweep within 30 s on the warm machine (it keeps /tmp between calls):
#   MINUTES=7 bash benchmarks/train_tiny.sh      (three 8-/4-layer variants at once, keeps the best)
#   REUSE_CKPT=1 bash benchmarks/accuracy_bench.sh
# 1. train benchmarks/tiny_vlm once on every regime's layout (a: question before the image; b: system
#    prompt / chat turns before it, question after; multi: 2-4 images)
# 2. eval sets A, B, multi and the A-B knob's mixes (held-out images), calibration requests (training
#    distribution, other images)
# 3. the stock server starts; vlcache_sglang.calibrate writes the layer profile meanwhile; the vlcache
#    server starts with --vlcache-profile (benchmarks/tiny_vlm/serve_eval.py)
# 4. accuracy.py sweep: full, none, first_k / vlcache / cacheblend at 0-50 % recompute, error_bounded at a
#    few bounds, per-request overrides on the one vlcache server, stock beside it; passes that would end
#    after the time budget are reported skipped (the most telling budgets run first)
# Results in $OUT: progress.log, train.log, profile.json, sweep.log, server_tails.txt, summary.md and
# accuracy.tgz (accuracy/: summary.md, sweep.md, sweep.json, knob.png, <set>/accuracy.{md,json,png}). The short table comes last.
# Knobs: QUICK=1, MINUTES, BUDGET_S (whole script), IMAGES, REPEATS, TRAIN_ARGS, LAYOUTS, BOUNDED (the policies
# run at each bound, default error_bounded,image_bounded), SWEEP_ARGS (sweep
# options, e.g. "--error-bounds 0.02,0.1"), VLCACHE_FLAGS (e.g. "--vlcache-blend-score v"), REUSE_SIM=1,
# REUSE_CKPT=1 (a warm machine: keep /tmp/tiny-qwen2.5-vl from the last run, skip training).
# CKPT (another checkpoint dir, e.g. train_tiny.sh's EXTRA variant /tmp/tiny-bchat; with REUSE_CKPT=1) and
# SETS (the data sets, default A,B,multi; KNOB sets run only with A and B both): a checkpoint trained on
# layout b alone has no regime A or multi, e.g. REUSE_CKPT=1 CKPT=/tmp/tiny-bchat SETS=B.
set -euo pipefail
t0=$(date +%s)  # before the bundle is unpacked: the budget is the whole command's
source benchmarks/gpu_env.sh  # OUT, PYTHONPATH; unpacks the dummy 7B directory (our tokenizer source)
QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then
  MINUTES=${MINUTES:-1.5}; BUDGET_S=${BUDGET_S:-320}; IMAGES=${IMAGES:-24}; REPEATS=${REPEATS:-4}; MULTI=24
  KNOB=mix:0.5; FRACTIONS=0,2,5,20; BOUNDS=0.1,0.25; CAL_IMAGES=8
else
  MINUTES=${MINUTES:-2.5}; BUDGET_S=${BUDGET_S:-560}; IMAGES=${IMAGES:-48}; REPEATS=${REPEATS:-5}; MULTI=48
  KNOB=mix:0.25,mix:0.5,mix:0.75; FRACTIONS=0,1,2,5,10,20,50; BOUNDS=0.1,0.25,0.05,0.5; CAL_IMAGES=12
fi
LAYOUTS=${LAYOUTS:-a:0.45,b:0.3,multi:0.25}
CKPT=${CKPT:-/tmp/tiny-qwen2.5-vl}
SETS=${SETS:-A,B,multi}
[[ ",$SETS," == *",A,"* && ",$SETS," == *",B,"* ]] || KNOB=""  # the knob mixes layouts a and b
DATA=/tmp/tiny_eval
# Passes start only if they end before this; ~45 s stay for stopping the servers and the tables.
DEADLINE=$(( t0 + BUDGET_S - 45 ))
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*" | tee -a "$OUT/progress.log"; }
quiet() { grep -v -i -e warn -e "loading weights" || true; }  # library chatter; never fails the pipe
stamp "start (QUICK=$QUICK, budget $BUDGET_S s)"

if [ "${REUSE_CKPT:-0}" = 1 ] && [ -f "$CKPT/model.safetensors" ] && [ -f "$CKPT/train_log.json" ]; then
  stamp "REUSE_CKPT=1: the checkpoint in $CKPT from an earlier run on this machine, no training"
  cp "$CKPT/train_log.json" "$CKPT/tiny_vlm_task.json" "$OUT/"
else
  stamp "train ($MINUTES min, layouts $LAYOUTS)"
  python3 -m benchmarks.tiny_vlm.train --out "$CKPT" --minutes "$MINUTES" --tokenizer-from "$MODEL" \
    --layouts "$LAYOUTS" ${TRAIN_ARGS:---layers 8} 2>&1 | quiet | tee "$OUT/train.log" | tail -3
  cp "$CKPT/train_log.json" "$CKPT/tiny_vlm_task.json" "$OUT/"
fi

if [ "${REUSE_SIM:-0}" = 1 ]; then
  stamp "reuse_sim (plain torch, layout a)"
  python3 -m benchmarks.tiny_vlm.reuse_sim --model "$CKPT" --pairs 512 --first-k 2,8,32 \
    --out "$OUT/reuse_sim.json" 2>&1 | quiet
fi

stamp "eval sets + calibration requests"
KNOB_SETS=$(echo "$KNOB" | tr ':' '-')
python3 -m benchmarks.tiny_vlm.make_eval --model "$CKPT" --out-dir "$DATA" --regimes "$SETS${KNOB:+,$KNOB}" \
  --images "$IMAGES" --repeats "$REPEATS" --multi-requests "$MULTI" --calibration "$CAL_IMAGES"

stamp "servers (stock; calibrate; vlcache with the profile) + sweep until $(( DEADLINE - t0 )) s"
rc=0
python3 -m benchmarks.tiny_vlm.serve_eval --model "$CKPT" --data-dir "$DATA" --sets "$SETS" \
  --knob-sets "$KNOB_SETS" --out-dir "$OUT/accuracy" --log-dir /tmp/tiny_server_logs \
  --calibration "$DATA/calibration.jsonl" --profile "$OUT/profile.json" --calibration-timeout-s 120 \
  --deadline-unix "$DEADLINE" \
  --progress "$OUT/progress.log" --vlcache-flags "${VLCACHE_FLAGS:-}" --tails-to "$OUT/server_tails.txt" \
  --sweep-args "--fractions $FRACTIONS --error-bounds $BOUNDS --bounded-policies ${BOUNDED:-error_bounded,image_bounded} ${SWEEP_ARGS:-}" >"$OUT/sweep.log" 2>&1 || rc=$?
cp /tmp/tiny_server_logs/calibrate.log "$OUT/" 2>/dev/null || true
if [ "$rc" != 0 ]; then
  stamp "serve_eval failed (exit $rc); sweep.log ends:"
  tail -30 "$OUT/sweep.log"
fi
stamp "done"
# At most 8 files come back from the GPU host: the tables and plots travel as one archive.
if [ -d "$OUT/accuracy" ]; then
  cp "$OUT/accuracy/summary.md" "$OUT/summary.md" 2>/dev/null || true
  tar -C "$OUT" -czf "$OUT/accuracy.tgz" accuracy && rm -rf "$OUT/accuracy"
fi
rm -f "$OUT/pip.log" "$OUT/tiny_vlm_task.json"
[ -f "$OUT/summary.md" ] && cat "$OUT/summary.md"
exit "$rc"
