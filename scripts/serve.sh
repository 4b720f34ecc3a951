#!/usr/bin/env bash
# Set up (or reuse) the virtualenv and serve Qwen2.5-VL with vlcache on this machine's GPU.
#   bash scripts/serve.sh                       # offline: dummy-weight Qwen2.5-VL-7B (real shapes)
#   MODEL=/path/to/Qwen2.5-VL-7B-Instruct bash scripts/serve.sh --port 30000   # real weights
# Extra arguments go to `python -m sglang.launch_server`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$VENV/bin/pip" install -q --no-deps -e . 2>/dev/null
LOAD=()
if [ -z "${MODEL:-}" ]; then
  MODEL=models/Qwen2.5-VL-7B-Instruct
  [ -f "$MODEL/tokenizer.json" ] || "$VENV/bin/python" -m vlcache_sglang.model_dir "$MODEL" --size 7B
  LOAD=(--load-format dummy)
fi
exec "$VENV/bin/python" -m sglang.launch_server --model-path "$MODEL" "${LOAD[@]}" \
  --attention-backend flashinfer --enable-vlcache --enable-cache-report "$@"
