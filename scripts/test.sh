#!/usr/bin/env bash
# The test command: set up from nothing (scripts/setup_env.sh), run the whole suite, then the route
# and permute tests once more on an AddressSanitizer + UBSan build of the CPU extension
# (scripts/sanitize.sh). CUDA-device tests skip without a GPU; the CUDA kernels still compile (spill
# check) and run in the SIMT emulator. Extra arguments go to the first pytest run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY="${L2R_VENV:-.venv}/bin/python"
set +e
"$PY" -m pytest tests -q -ra --durations=15 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
  echo "pytest collected no tests: the suite is broken" >&2
  exit 1
fi
if [ "$rc" -ne 0 ]; then
  exit "$rc"
fi
bash scripts/sanitize.sh
