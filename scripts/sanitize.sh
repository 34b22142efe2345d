#!/usr/bin/env bash
# The CPU extension once more under AddressSanitizer + UBSan (-O1, CPU-only), and the route and
# permute tests run on it: an out-of-bounds access or undefined behaviour in any CPU kernel fails
# the run. Builds a copy of the working tree (tracked and untracked, not ignored, files) in
# build/sanitize/src so the regular build is left alone. Extra arguments go to pytest.
#
# Known needs: libasan and libstdc++ are preloaded (else ASan aborts on the first C++ exception
# thrown inside torch); triton is hidden (importing it under ASan aborts); leak detection is off
# (CPython and torch keep allocations alive until exit by design).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
PY="$ROOT/${L2R_VENV:-.venv}/bin/python"
WORK="$ROOT/build/sanitize"
SRC="$WORK/src"

echo "[sanitize] copying the tree to $SRC"
rm -rf "$SRC"
mkdir -p "$SRC" "$WORK/hide"
git ls-files --cached --others --exclude-standard -z | while IFS= read -r -d '' f; do
  [ -e "$f" ] || continue
  mkdir -p "$SRC/$(dirname "$f")"
  cp -p "$f" "$SRC/$f"
done

echo "[sanitize] building the CPU extension with -fsanitize=address,undefined"
(cd "$SRC" && L2R_CUDA=0 L2R_SANITIZE=1 MAX_JOBS="${MAX_JOBS:-2}" "$PY" setup.py build_ext --inplace > "$WORK/build.log" 2>&1) || {
  tail -50 "$WORK/build.log"; exit 1; }

# sitecustomize runs at interpreter start: every later `import triton` raises ImportError, which
# torch treats as "no triton".
echo "import sys; sys.modules['triton'] = None" > "$WORK/hide/sitecustomize.py"

ASAN_LIB="$(gcc -print-file-name=libasan.so)"
STDCXX_LIB="$(gcc -print-file-name=libstdc++.so)"
echo "[sanitize] running the route and permute tests (CPU backends) under ASan + UBSan"
cd "$SRC"
set +e
LD_PRELOAD="$ASAN_LIB $STDCXX_LIB" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1:allocator_may_return_null=1" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
PYTHONPATH="$WORK/hide:$SRC" L2R_EXPECT_SANITIZED=1 \
  "$PY" -m pytest tests/test_route.py tests/test_permute.py tests/test_second_order.py tests/test_sanitized.py \
  -q -p no:cacheprovider -k "not simt and not cuda and not compile" "$@"
rc=$?
set -e
exit "$rc"
