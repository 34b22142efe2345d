#!/usr/bin/env bash
# The test command: set up from nothing (scripts/setup_env.sh), then run the whole suite.
# CUDA-device tests skip without a GPU; the CUDA kernels still compile (spill check) and run in the
# SIMT emulator. Extra arguments go to pytest.
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
exit "$rc"
