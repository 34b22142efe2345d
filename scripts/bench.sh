#!/usr/bin/env bash
# The main job: set up from nothing, then the quick routing benchmark (L2R vs linear gating and the
# reference) writing its table, CSV and plot to benchmarks/results/. Extra arguments go to it
# (drop --quick by passing --full).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_env.sh
PY="${L2R_VENV:-.venv}/bin/python"
if [ "${1:-}" = "--full" ]; then shift; exec "$PY" -m benchmarks.route "$@"; fi
exec "$PY" -m benchmarks.route --quick "$@"
