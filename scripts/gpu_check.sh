#!/usr/bin/env bash
# One command for a machine with an NVIDIA GPU (H100/H200 class: about 10 minutes on 2026-12-04,
# 4.7-5.1 of them the build of route_cuda.cu as one translation unit on 16 cores; the route kernels
# now compile in 9 more, csrc/route/cuda/apart/, not yet timed on a GPU machine). It
#   1. builds l2r_cuda in place for this GPU's architecture only (MAX_JOBS = all cores), and meanwhile
#      builds and runs the tensor-core checks (tests/gpu/mma_fragments_main.cu, project_mma_main.cu:
#      the kernels the SIMT emulator runs in tests/simt/test_mma.py and test_project_mma.py, built
#      with nvcc, against a CPU product),
#   2. runs the CUDA tests (pytest -m cuda: CUDA vs CPU results, opcheck, CUDA-graph capture; in
#      parallel workers where pytest-xdist is installed) and, beside them, compute-sanitizer's
#      memcheck and racecheck on l2r's kernels, initcheck on every kernel (scripts/gpu_sanitize.py: every kernel
#      family at small shapes),
#   3. times route forward / forward+backward, permute and unpermute at the cost model's shapes
#      (benchmarks/results/gpu_model.json) against linear gating and the compiled reference, with
#      CUDA events: measured next to modelled time, achieved GB/s, % of the device's bandwidth;
#      alone on the GPU; then each call's kernels (torch.profiler) with launch overhead amortized
#      (benchmarks/gpu_profile.py --sweep: where the time goes, and the forward against T),
# and writes everything (environment, build log, test log, sanitizer logs, timing.md/json,
# summary.md) to the results folder it names. Without an NVIDIA GPU it exits at once with status 3
# and says why.
#
#   L2R_VENV=path          Python environment to use (default: .venv when it has torch, else the
#                          machine's python3; nothing is downloaded)
#   L2R_GPU_CHECK_OUT=dir  results folder (default benchmarks/results/gpu_check/<UTC time>-<GPU>)
#   L2R_GPU_CHECK_BUDGET=s seconds after which the timing stops compiling the reference (default 60)
#   L2R_GPU_CHECK_STEP_S=s the most seconds the tests, each sanitizer tool and the timing may take
#                          (default 900; the build has an hour): a step past it is stopped and
#                          counted as failed; the timing keeps the shapes it finished
#   NVIDIA_SMI=path        the nvidia-smi to ask (default: nvidia-smi on PATH)
set -uo pipefail
cd "$(dirname "$0")/.."

SMI="${NVIDIA_SMI:-nvidia-smi}"
if ! command -v "$SMI" >/dev/null 2>&1; then
  echo "gpu_check.sh: no NVIDIA GPU: '$SMI' not found. This script builds and times the CUDA kernels on a GPU;" \
       "without one, run scripts/test.sh (emulated kernels) and python -m benchmarks.gpu_model (cost model)." >&2
  exit 3
fi
if ! "$SMI" -L 2>/dev/null | grep -q '^GPU '; then
  echo "gpu_check.sh: no NVIDIA GPU: '$SMI -L' lists no device." >&2
  exit 3
fi

START=$(date +%s)
GPU_NAME=$("$SMI" --query-gpu=name --format=csv,noheader | head -n1)
ARCH=$("$SMI" --query-gpu=compute_cap --format=csv,noheader | head -n1 | tr -d ' ')  # e.g. 9.0
SAFE_NAME=$(printf '%s' "$GPU_NAME" | tr -c 'A-Za-z0-9' '_')
OUT="${L2R_GPU_CHECK_OUT:-benchmarks/results/gpu_check/$(date -u +%Y%m%dT%H%M%SZ)-${SAFE_NAME}}"
mkdir -p "$OUT"
echo "gpu_check.sh: $GPU_NAME (sm_${ARCH/./}); results in $OUT"

if [ -n "${L2R_VENV:-}" ]; then
  PY="$L2R_VENV/bin/python"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" >/dev/null 2>&1; then
  PY=.venv/bin/python
else
  PY=$(command -v python3)
fi
STATUS=0
step() {  # step NAME LOGFILE CMD...: runs CMD, logs it, remembers a failure
  local name=$1 log=$2
  shift 2
  local t0=$(date +%s)
  echo "gpu_check.sh: $name ..."
  timeout --kill-after=10 "${STEP_LIMIT:-${L2R_GPU_CHECK_STEP_S:-900}}" "$@" >"$log" 2>&1
  local rc=$?
  echo "gpu_check.sh: $name: exit $rc after $(( $(date +%s) - t0 )) s (log: $log)"
  [ "$rc" -eq 0 ] || STATUS=1
  return "$rc"
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "git: $(git rev-parse HEAD 2>/dev/null) $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "python: $PY ($("$PY" --version 2>&1))"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu visible', torch.cuda.is_available())"
  command -v nvcc >/dev/null && nvcc --version | tail -n2
  echo "cores: $(nproc)"
  "$SMI"
} >"$OUT/environment.txt" 2>&1

export TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="$(nproc)" L2R_CUDA=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# The tensor-core programs need only nvcc: built and run while the extension builds. The toolkit
# the build uses (torch's CUDA_HOME), else nvcc on PATH.
NVCC="$("$PY" -c "from torch.utils.cpp_extension import CUDA_HOME; print(CUDA_HOME or '')" 2>/dev/null)/bin/nvcc"
[ -x "$NVCC" ] || NVCC=$(command -v nvcc || echo nvcc)
tensor_core_checks() {
  local prog rc=0
  for prog in mma_fragments project_mma; do
    step "tensor cores: $prog" "$OUT/$prog.log" bash -c \
      "'$NVCC' -std=c++17 -arch=sm_${ARCH/./} -Icsrc tests/gpu/${prog}_main.cu -o '$OUT/$prog' && '$OUT/$prog'" || rc=1
    grep -E ": (ok|MISMATCH)$|failed" "$OUT/$prog.log"
    rm -f "$OUT/$prog"
  done
  return "$rc"
}
tensor_core_checks &
TC_PID=$!
if ! STEP_LIMIT=3600 step "build (sm_${ARCH/./} only, MAX_JOBS=$MAX_JOBS)" "$OUT/build.log" "$PY" setup.py build_ext --inplace; then
  echo "gpu_check.sh: the build failed; see $OUT/build.log" >&2
  exit 1
fi
wait "$TC_PID" || STATUS=1

# The tests and the sanitizer both check correctness, so they share the GPU; the timing runs alone.
XDIST=()
"$PY" -c "import xdist" >/dev/null 2>&1 && XDIST=(-n "$(( $(nproc) > 12 ? 6 : 2 ))")
step "CUDA tests" "$OUT/tests.log" "$PY" -m pytest tests -m cuda -v --tb=short -ra -p no:cacheprovider "${XDIST[@]}" &
TESTS_PID=$!
SANITIZER=$(command -v compute-sanitizer || true)
[ -n "$SANITIZER" ] || { [ -x "$(dirname "$NVCC")/compute-sanitizer" ] && SANITIZER="$(dirname "$NVCC")/compute-sanitizer"; }
sanitizer_checks() {  # the three tools at once (each a process of its own), beside the tests
  local tool pids=() rc=0
  for tool in memcheck racecheck initcheck; do
    # memcheck and racecheck: only l2r's kernels (namespace l2r), torch's are not ours to check.
    # initcheck sees every kernel: with the filter it reported the reads of tensors that PyTorch's
    # kernels wrote (it does not track writes of kernels it skips, as far as the first H200 run showed).
    local filter=(--kernel-name kns=l2r)
    [ "$tool" = initcheck ] && filter=()
    step "compute-sanitizer $tool" "$OUT/sanitize_$tool.log" "$SANITIZER" --tool "$tool" --error-exitcode 1 \
      "${filter[@]}" "$PY" scripts/gpu_sanitize.py &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=1; done
  grep -HE "ERROR SUMMARY|RACECHECK SUMMARY" "$OUT"/sanitize_*.log
  return "$rc"
}
if [ -n "$SANITIZER" ]; then
  sanitizer_checks || STATUS=1
else
  echo "gpu_check.sh: no compute-sanitizer found; the sanitizer step is skipped" | tee "$OUT/sanitize_memcheck.log"
fi
wait "$TESTS_PID" || STATUS=1
grep -E "passed|failed|error" "$OUT/tests.log" | tail -n1
step "timing" "$OUT/timing.log" "$PY" -m benchmarks.gpu_check --out "$OUT" --budget-s "${L2R_GPU_CHECK_BUDGET:-60}"
step "kernel profile" "$OUT/profile.log" "$PY" -m benchmarks.gpu_profile --out "$OUT" --sweep

{
  echo "# gpu_check.sh on $GPU_NAME"
  echo
  echo "$(date -u +%FT%TZ), git $(git rev-parse --short HEAD 2>/dev/null), $(( $(date +%s) - START )) s in all."
  echo "Build: TORCH_CUDA_ARCH_LIST=$ARCH, MAX_JOBS=$MAX_JOBS. Tests: $(grep -E 'passed|failed|error|skipped' "$OUT/tests.log" | tail -n1)"
  echo "Tensor cores (tests/gpu/*_main.cu): mma_fragments $(grep -c ': ok$' "$OUT/mma_fragments.log" 2>/dev/null) of 4 cases ok, project_mma $(grep -c ': ok$' "$OUT/project_mma.log" 2>/dev/null) of 4 ok"
  for tool in memcheck racecheck initcheck; do
    echo "compute-sanitizer $tool: $(grep -hE 'ERROR SUMMARY|skipped' "$OUT/sanitize_$tool.log" 2>/dev/null | tail -n1)"
  done
  echo
  [ -f "$OUT/timing.md" ] && cat "$OUT/timing.md"
  echo
  [ -f "$OUT/profile.md" ] && cat "$OUT/profile.md"
} >"$OUT/summary.md"
echo "gpu_check.sh: done in $(( $(date +%s) - START )) s, status $STATUS; summary: $OUT/summary.md"
exit "$STATUS"
