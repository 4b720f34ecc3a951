#!/usr/bin/env bash
# Image affinity: two vlcache replicas on ONE GPU behind SGLang's router (smg 1.9.0), round robin vs
# routing by X-SMG-Routing-Key (vlcache_sglang/routing_key.py) vs the router's text-only cache_aware,
# on a workload of more distinct images than one replica's store holds (benchmarks/affinity.py).
#
# The router (~18 MB) does not fit beside .gpu_bundle (~61 MB) in one call's 64 MiB, so two calls
# on one warm machine (repo root each time):
#   here, once:                   bash benchmarks/pack_router.sh          (-> .router_bundle/smg.tar.xz)
#   call 1, carry .gpu_bundle:    source benchmarks/gpu_env.sh            (unpacks SGLang + model to /tmp)
#   call 2, carry .router_bundle: bash benchmarks/affinity.sh             (~5-8 min, stops by BUDGET_S)
# CPU dry run against fake replicas and the real router: DRY_RUN=1 bash benchmarks/affinity.sh
#
# Results in $OUT: affinity.md (the table), affinity.json, affinity.log (the driver's output),
# details.tar.gz (server and router logs, per-request rows). The short table comes last.
# Knobs: BUDGET_S (whole script, default 530), AFFINITY_ARGS (more affinity.py options, e.g.
# "--pool-size 12 --store-images 5 --requests 240 --concurrency 8 --tenants 2").
set -euo pipefail
t0=$(date +%s)
BUDGET_S=${BUDGET_S:-530}
RUN=/tmp/affinity_run
rm -rf "$RUN" && mkdir -p "$RUN/logs"
if [ "${DRY_RUN:-0}" = 1 ]; then
  OUT=${OUT:-/tmp/affinity_dry_out}
  mkdir -p "$OUT"
  PY=${PYTHON:-python3}
  SMG_SITE=/tmp/affinity_smg
  [ -d "$SMG_SITE/smg" ] || { mkdir -p "$SMG_SITE" && tar -C "$SMG_SITE" -xJf .router_bundle/smg.tar.xz; }
  export PYTHONPATH="$SMG_SITE${PYTHONPATH:+:$PYTHONPATH}"
  EXTRA=(--replica-command "$PY tests/benchmarks/fake_sglang.py {port} --store-images {store_images}"
         --image-size 64 48 --requests 60)
else
  if [ ! -d /tmp/site/sglang ] && [ ! -f .gpu_bundle/site.tar.xz ]; then
    echo "no SGLang on this machine: first a call with .gpu_bundle carried: source benchmarks/gpu_env.sh"
    exit 2
  fi
  source benchmarks/gpu_env.sh  # OUT, SITE, MODEL, PYTHONPATH; installs this package into $SITE
  if [ ! -d "$SITE/smg" ]; then
    [ -f .router_bundle/smg.tar.xz ] || { echo "no .router_bundle/smg.tar.xz: bash benchmarks/pack_router.sh here, carry .router_bundle"; exit 2; }
    tar -C "$SITE" -xJf .router_bundle/smg.tar.xz
  fi
  PY=python3
  EXTRA=(--model "$MODEL")
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader | tee "$RUN/gpu.txt" || true
fi
"$PY" -c "import smg.launch_router" || { echo "smg does not import (PYTHONPATH=$PYTHONPATH)"; exit 2; }

left=$(( BUDGET_S - ($(date +%s) - t0) ))
rc=0
# SIGTERM at the limit: affinity.py stops its replicas and router on the way out. No arm starts in
# the last 90 s (an arm is ~10-40 s on the GPU, stopping two servers ~20 s).
timeout -s TERM "$(( left - 15 ))" "$PY" benchmarks/affinity.py --out-dir "$RUN" --log-dir "$RUN/logs" \
  --deadline-unix "$(( t0 + BUDGET_S - 90 ))" "${EXTRA[@]}" ${AFFINITY_ARGS:-} >"$OUT/affinity.log" 2>&1 || rc=$?
for f in affinity.md affinity.json; do [ -f "$RUN/$f" ] && cp "$RUN/$f" "$OUT/"; done
tar -C "$RUN" -czf "$OUT/details.tar.gz" --exclude=affinity.md --exclude=affinity.json . || true
echo "affinity.py exit $rc after $(( $(date +%s) - t0 )) s; log tail:"
grep -v "^|" "$OUT/affinity.log" | tail -10
[ -f "$OUT/affinity.md" ] && { echo; sed -n '/^| arm/,/^$/p' "$OUT/affinity.md"; }
exit "$rc"
