# Sourced by the GPU scripts: unpack the carried bundle and model once per machine, install this
# package into the bundle's site folder, and provide start_server / stop_server.
OUT=${OUT:-/tmp/vlcache_out}
mkdir -p "$OUT"
SITE=/tmp/site
MODEL=/tmp/Qwen2.5-VL-7B-Instruct
PORT=${PORT:-30000}
export PYTHONUNBUFFERED=1
# Scripts run side by side each source this file, so the set-up runs under one lock: tar makes its
# folders before it has filled them, and pip's build/ folder is shared.
unpack_bundle() {  # each part once per machine; a marker says it was unpacked whole
  if [ ! -f "$SITE/.unpacked" ]; then
    mkdir -p "$SITE" && tar -C "$SITE" -xJf .gpu_bundle/site.tar.xz && touch "$SITE/.unpacked" || return 1
  fi
  if [ ! -f "$MODEL/.unpacked" ]; then
    tar -C /tmp -xJf .gpu_bundle/model.tar.xz && touch "$MODEL/.unpacked" || return 1
  fi
}
install_package() {  # our package (with its entry point) into the bundle's site folder, once per tree
  local stamp  # names and contents of every file the install takes
  stamp=$(find setup.py vlcache_sglang -type f ! -path '*__pycache__*' -print0 | sort -z | xargs -0 md5sum | md5sum)
  [ "$(cat "$SITE/.vlcache_stamp" 2>/dev/null)" = "$stamp" ] && return 0
  python3 -m pip install -q --no-deps --no-index --no-build-isolation --upgrade --target "$SITE" . \
    >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; return 1; }
  echo "$stamp" >"$SITE/.vlcache_stamp"
}
( flock 9 && unpack_bundle && install_package ) 9>/tmp/vlcache_setup.lock || exit 1
export PYTHONPATH="$SITE"
SERVER_FLAGS=(--model-path "$MODEL" --load-format dummy --attention-backend flashinfer
  --mm-attention-backend triton_attn --grammar-backend none --mem-fraction-static 0.7 --port "$PORT"
  --enable-cache-report --cuda-graph-max-bs 8)

start_server() {  # label, extra flags... ; sets SERVER_PID, returns 1 if it never gets healthy
  local label=$1; shift
  # A server left on the port would answer /health for this one and be measured under its label.
  if curl -s -o /dev/null "http://127.0.0.1:$PORT/health"; then echo "server $label: port $PORT already in use"; return 1; fi
  python3 -m sglang.launch_server "${SERVER_FLAGS[@]}" "$@" >"$OUT/server_$label.log" 2>&1 &
  SERVER_PID=$!
  local t0=$(date +%s)
  until curl -sf "http://127.0.0.1:$PORT/health" >/dev/null; do
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "server $label died"; tail -30 "$OUT/server_$label.log"; return 1; fi
    if (( $(date +%s) - t0 > 300 )); then echo "server $label: no health after 300 s"; kill "$SERVER_PID"; return 1; fi
    sleep 2
  done
  echo "server $label healthy after $(( $(date +%s) - t0 )) s"
}

stop_server() {
  kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null
  sleep 2
}
