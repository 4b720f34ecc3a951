#!/usr/bin/env bash
# Write the offline Qwen2.5-VL-7B-Instruct directory with the project's own writer and put it,
# xz-compressed (~2 MB), into the carried bundle folder:  bash benchmarks/pack_model.sh .gpu_bundle
set -euo pipefail
DEST=${1:-.gpu_bundle}
TMP=$(mktemp -d)
python3 -m vlcache_sglang.model_dir "$TMP/Qwen2.5-VL-7B-Instruct" --size 7B >/dev/null
mkdir -p "$DEST"
tar -C "$TMP" -cf - Qwen2.5-VL-7B-Instruct | xz -9 -T2 > "$DEST/model.tar.xz"
rm -rf "$TMP"
ls -l "$DEST/model.tar.xz"
