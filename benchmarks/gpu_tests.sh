#!/usr/bin/env bash
# The tests that take a GPU path (Triton kernels compiled for it, FlashInfer, real CUDA graph capture,
# SGLang's CUDA M-RoPE), on the GPU host (repo root, .gpu_bundle carried; ~3 min):
#   bash benchmarks/gpu_tests.sh [pytest args]
# The log goes to $OUT/pytest.log; the summary is printed last. gpu_check.sh runs this too.
set -uo pipefail
source benchmarks/gpu_env.sh
GPU_TESTS=(tests/kernels tests/model_patch tests/compression tests/test_recompute_policy.py tests/test_image_key.py
  tests/test_radix_mm_cache.py tests/test_reuse_planner.py tests/test_processor_patch.py)
VLCACHE_TEST_MODEL_DIR=$MODEL python3 -m pytest -q -p no:cacheprovider -rfs "${GPU_TESTS[@]}" "$@" 2>&1 \
  | tee "$OUT/pytest.log" | grep -E "^(FAILED|ERROR)|passed|failed" | tail -25
exit "${PIPESTATUS[0]}"
