#!/usr/bin/env bash
# Sets up everything from nothing: a virtualenv in .venv, torch 2.14.1 (CUDA 13 build: the CUDA
# kernels compile even without a GPU), the test/bench/example dependencies (cupy for l2r_cuda.jit's
# tests: it imports without a GPU), and an editable build of l2r_cuda. Safe to re-run: it only installs what is missing and rebuilds what changed.
#
#   L2R_VENV=path        virtualenv to use (default .venv)
#   L2R_TORCH=spec       torch requirement (default torch==2.14.1; e.g. torch==2.13.0 for CPU-only)
#   TORCH_CUDA_ARCH_LIST archs for the CUDA build (default "8.0;9.0+PTX")
#   L2R_CUDA=0|1         force a CPU-only / CUDA build (default: CUDA when torch has it and nvcc is found)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${L2R_VENV:-.venv}"
TORCH_SPEC="${L2R_TORCH:-torch==2.14.1}"
PYTHON_BIN="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV with $($PYTHON_BIN --version)"
  "$PYTHON_BIN" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip --disable-pip-version-check -q)

echo "[setup] installing $TORCH_SPEC and dependencies"
"${PIP[@]}" install "$TORCH_SPEC" numpy setuptools wheel ninja pytest expecttest \
  "transformers==5.24.0" scikit-learn matplotlib tqdm "cupy-cuda13x==14.2.0"
"$PY" -c "import torch, transformers, sklearn, matplotlib, tqdm; print('[setup] torch', torch.__version__, 'cuda', torch.version.cuda)"

echo "[setup] building l2r_cuda (MAX_JOBS=${MAX_JOBS:-2})"
MAX_JOBS="${MAX_JOBS:-2}" "${PIP[@]}" install --no-build-isolation -e .
"$PY" -c "import l2r_cuda; print('[setup] l2r_cuda', l2r_cuda.__version__, 'cuda_built =', l2r_cuda.cuda_built())"
