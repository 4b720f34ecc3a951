#!/usr/bin/env bash
# SGLang's router for the offline GPU host, xz-compressed (~18 MB), into its own carried folder:
#   bash benchmarks/pack_router.sh [.router_bundle]
# smg 1.9.0 is the router release paired with SGLang 0.5.16 (its release workflow builds the
# v1.9.0-sglang-v0.5.16 image); SMG_VERSION picks another. Only the `smg` package travels: its
# launcher needs setproctitle (in .gpu_bundle) and nothing else. The Rust extension is stripped of
# symbols (92 -> 65 MB). It does not fit in one call beside .gpu_bundle (64 MiB a call): carry
# .gpu_bundle in one call (source benchmarks/gpu_env.sh unpacks it to /tmp), this in the next.
set -euo pipefail
DEST=${1:-.router_bundle}
VERSION=${SMG_VERSION:-1.9.0}
TMP=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$TMP/whl" "smg==$VERSION"
python3 -m zipfile -e "$TMP"/whl/smg-*.whl "$TMP/site"
strip --strip-all "$TMP"/site/smg/smg_rs*.so
mkdir -p "$DEST"
tar -C "$TMP/site" -cf - smg "smg-$VERSION.dist-info" | xz -9 -T2 > "$DEST/smg.tar.xz"
rm -rf "$TMP"
ls -l "$DEST/smg.tar.xz"
