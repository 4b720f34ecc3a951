#!/usr/bin/env bash
# The test command: set up (or reuse) the virtualenv, install this checkout, run the tests.
# Without a GPU, kernels run under Triton's interpreter and GPU-only tests skip with a reason.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh
"$VENV/bin/pip" install -q --no-deps -e . 2>/dev/null
exec "$VENV/bin/python" -m pytest -q tests "$@"
