#!/usr/bin/env bash
# Train several tiny Qwen2.5-VL variants at once on the GPU host and keep the best as the checkpoint
# the accuracy and soak scripts reuse (REUSE_CKPT=1 on the warm machine):
#   bash benchmarks/train_tiny.sh            (repo root, .gpu_bundle carried; MINUTES + ~1 min)
# The model is small and its steps are launch-bound, so variants share the one GPU at little cost each.
# VARIANTS: "name:train.py flags|name:flags|..."; the one with the best held-out accuracy ("all") is
# copied to /tmp/tiny-qwen2.5-vl. EXTRA: variants trained alongside but not in that choice, each left in
# /tmp/tiny-<name> (the default: the compression task's checkpoint compression_bench.sh reuses,
# COMPRESS_TASK=counts: /tmp/tiny-counts, reused by REUSE_CKPT=1 bash benchmarks/compression_bench.sh;
# flags in benchmarks/compression_task.sh). Logs in $OUT/train_<name>.log, the choice in $OUT/train_choice.txt.
set -uo pipefail
source benchmarks/gpu_env.sh
MINUTES=${MINUTES:-7}
LAYOUTS=${LAYOUTS:-a:0.45,b:0.3,multi:0.25}
VARIANTS=${VARIANTS:-"l8:--layers 8|l8s1:--layers 8 --seed 1|l4:--layers 4"}
source benchmarks/compression_task.sh || exit 1
EXTRA=${EXTRA-$TASK_VARIANT}
CKPT=/tmp/tiny-qwen2.5-vl
IFS='|' read -ra specs <<<"$VARIANTS"
IFS='|' read -ra extras <<<"$EXTRA"
pids=()
for spec in "${specs[@]}" "${extras[@]}"; do
  [ -n "$spec" ] || continue
  name=${spec%%:*}; flags=${spec#*:}
  # shellcheck disable=SC2086  # flags are words
  python3 -m benchmarks.tiny_vlm.train --out "/tmp/tiny-$name" --minutes "$MINUTES" --tokenizer-from "$MODEL" \
    --layouts "$LAYOUTS" $flags >"$OUT/train_$name.log" 2>&1 &
  pids+=($!)
done
for p in "${pids[@]}"; do wait "$p"; done
python3 - "$OUT" "$CKPT" "${#specs[@]}" "${specs[@]}" "${extras[@]}" <<'PY'
import json, shutil, sys
from pathlib import Path
out, ckpt, n_choose = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
specs = [s for s in sys.argv[4:] if s]
rows = []
for spec in specs:
    name, flags = spec.split(":", 1)
    log = Path(f"/tmp/tiny-{name}/train_log.json")
    r = json.loads(log.read_text()) if log.is_file() and Path(f"/tmp/tiny-{name}/model.safetensors").is_file() else None
    rows.append((name, flags, r))
    acc = r["held_out_acc"] if r else {}
    print(f"{name:6s} {flags:28s} steps {r['steps'] if r else '-':>5} held-out all {acc.get('all', float('nan')):.3f}  "
          + " ".join(f"{k} {v:.2f}" for k, v in acc.items() if k != "all"))
ok = [(r["held_out_acc"]["all"], n) for n, _, r in rows[:n_choose] if r]
for n, _, r in rows[n_choose:]:
    print(f"{n}: {'/tmp/tiny-' + n if r else 'FAILED (train_' + n + '.log)'} (extra, not in the choice)")
if not ok:
    sys.exit("no variant wrote a checkpoint (see train_*.log)")
best = max(ok)[1]
shutil.rmtree(ckpt, ignore_errors=True)
shutil.copytree(f"/tmp/tiny-{best}", ckpt)
(out / "train_choice.txt").write_text(f"{best}\n")
shutil.copy(ckpt / "train_log.json", out / "train_log.json")
print(f"kept {best} as {ckpt}")
PY
