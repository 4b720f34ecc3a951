#!/usr/bin/env bash
# bench_serving on a recurring-image workload, stock SGLang vs vlcache, same GPU, same run.
#   PRESET=single-1080p POLICIES="first_k" NUM=64 bash benchmarks/serve_bench.sh
# Prints a table last (TTFT p50/p90, throughput, cache hit rate per server and concurrency).
set -uo pipefail
source benchmarks/gpu_env.sh
PRESET=${PRESET:-single-1080p}; NUM=${NUM:-64}; RAW=/tmp/bench_raw; mkdir -p "$RAW"; rm -f "$RAW"/*.jsonl
python3 benchmarks/workloads.py --preset "$PRESET" --num-requests "$NUM" --seed 1 --out "$RAW/workload.jsonl"
for label in stock ${POLICIES:-first_k}; do
  extra=(); [ "$label" != stock ] && extra=(--enable-vlcache --vlcache-policy "$label")
  start_server "bench_$label" "${extra[@]}" || continue
  for conc in 1 16; do
    python3 -m sglang.bench_serving --backend sglang-oai-chat --dataset-name openai \
      --dataset-path "$RAW/workload.jsonl" --num-prompts "$NUM" --max-concurrency "$conc" --cache-report \
      --port "$PORT" --output-file "$RAW/${label}_c${conc}.jsonl" >"$RAW/${label}_c${conc}.log" 2>&1 \
      || tail -5 "$RAW/${label}_c${conc}.log"
  done
  stop_server
done
python3 - "$RAW" "$PRESET" <<'PY' | tee "$OUT/bench_summary.md"
import glob, json, os, sys
raw, preset = sys.argv[1], sys.argv[2]
# bench_serving's cache_hit_rate_pct divides by prompt lengths it estimates from the chat template
# without expanding image tokens, so it is not a rate here; cached tokens are in reuse_check.py's table.
print(f"| preset | server | concurrency | TTFT p50 ms | TTFT p90 ms | E2E p50 ms | req/s |")
print("|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(f"{raw}/*_c*.jsonl")):
    label, conc = os.path.basename(path)[:-6].rsplit("_c", 1)
    r = json.loads(open(path).read().strip().splitlines()[-1])
    print(f"| {preset} | {label} | {conc} | {r['median_ttft_ms']:.0f} | {r['p90_ttft_ms']:.0f} | "
          f"{r['median_e2e_latency_ms']:.0f} | {r['request_throughput']:.2f} |")
PY
