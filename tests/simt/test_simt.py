"""Self-tests of the SIMT CPU emulation harness (no GPU needed)."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
try:
    from . import harness as simt
except ImportError:
    sys.path.insert(0, str(HERE))
    import harness as simt  # type: ignore

pytestmark = pytest.mark.skipif(not simt.have_compiler(), reason="g++ not available")

SEEDS = (0, 1, 2, 3, 4)
P = simt.ptr
I = ctypes.c_int

DRIVER = r"""
namespace selftest { void launch_block_sum(const float*, float*, int, int, bool, cudaStream_t); }
extern "C" int st_block_sum(const float* x, float* out, int n, int block, int broken) {
  selftest::launch_block_sum(x, out, n, block, broken != 0, nullptr);
  return (int)cudaGetLastError();
}
"""


@pytest.fixture(scope="module")
def lib():
    # The emulator's own semantics, without the memory checker: some kernels here are deliberately
    # racy to show what the scheduler alone exposes (test_sanitizer.py checks them with it).
    lib = simt.build(sources=[HERE / "kernels" / "selftest.cu"], driver_source=DRIVER, name="selftest",
                     sanitize=False)
    simt.clear_error(lib)
    simt.set_order(lib, "random")
    yield lib
    simt.clear_error(lib)


def ints_as_float(rng, n, lo=-50, hi=50):
    # integer-valued floats: sums are exact whatever the order
    return rng.integers(lo, hi, size=n).astype(np.float32)


# ---------------------------------------------------------------- reductions
@pytest.mark.parametrize("block", [32, 64, 100, 256, 1000, 1024])
def test_block_reduction(lib, block):
    rng = np.random.default_rng(block)
    n = 3 * block - 17
    x = ints_as_float(rng, n)
    nb = (n + block - 1) // block
    for seed in SEEDS[:3]:
        simt.set_seed(lib, seed)
        out = np.full(nb, np.nan, np.float32)
        assert simt.call(lib, "st_block_sum", P(x), P(out), I(n), I(block), I(0)) == 0
        ref = np.array([x[b * block:(b + 1) * block].sum() for b in range(nb)], np.float32)
        np.testing.assert_array_equal(out, ref)


def test_missing_syncthreads_is_caught(lib):
    rng = np.random.default_rng(0)
    block, n = 256, 1024
    x = ints_as_float(rng, n, 1, 9)
    ref = x.reshape(-1, block).sum(1)
    wrong = 0
    for seed in SEEDS:
        simt.set_seed(lib, seed)
        out = np.zeros(n // block, np.float32)
        simt.call(lib, "st_block_sum", P(x), P(out), I(n), I(block), I(1))
        wrong += int(not np.array_equal(out, ref))
    assert wrong >= 1, "random thread order did not expose the missing __syncthreads"
    # and the correct kernel passes under the same seeds
    for seed in SEEDS:
        simt.set_seed(lib, seed)
        out = np.zeros(n // block, np.float32)
        simt.call(lib, "st_block_sum", P(x), P(out), I(n), I(block), I(0))
        np.testing.assert_array_equal(out, ref)


def test_missing_syncwarp_is_caught(lib):
    expect = ((np.arange(32) + 1) % 32 * 10).astype(np.int32)
    wrong = 0
    for seed in SEEDS:
        simt.set_seed(lib, seed)
        out = np.zeros(32, np.int32)
        simt.call(lib, "st_warp_exchange", P(out), I(1))
        np.testing.assert_array_equal(out, expect)
        out2 = np.zeros(32, np.int32)
        simt.call(lib, "st_warp_exchange", P(out2), I(0))
        wrong += int(not np.array_equal(out2, expect))
    assert wrong >= 1


@pytest.mark.parametrize("block", [32, 96, 100, 250, 1024])
def test_warp_shuffle_reduction(lib, block):
    rng = np.random.default_rng(block)
    n = 2 * block + 5
    x = ints_as_float(rng, n)
    nb = (n + block - 1) // block
    for seed in SEEDS[:3]:
        simt.set_seed(lib, seed)
        out = np.full(nb, np.nan, np.float32)
        assert simt.call(lib, "st_warp_sum", P(x), P(out), I(n), I(block)) == 0
        ref = np.array([x[b * block:(b + 1) * block].sum() for b in range(nb)], np.float32)
        np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("block", [32, 48, 64])
def test_vote_and_shuffle_variants(lib, block):
    rng = np.random.default_rng(block)
    x = rng.integers(-3, 10, size=block).astype(np.int32)
    out = np.zeros(block * 6, np.uint32)
    simt.call(lib, "st_vote", P(x), P(out), I(block), I(block), seed=7)
    out = out.reshape(block, 6)
    for w in range((block + 31) // 32):
        lanes = np.arange(w * 32, min(block, w * 32 + 32))
        xv = x[lanes]
        ballot = sum(1 << i for i, v in enumerate(xv) if v > 0)
        full = (1 << len(lanes)) - 1
        assert (out[lanes, 0] == ballot).all()
        assert (out[lanes, 1] == int((xv > 5).any())).all()
        assert (out[lanes, 2] == int((xv >= 0).all())).all()
        up = np.concatenate([xv[:1], xv[:-1]]).astype(np.uint32)
        np.testing.assert_array_equal(out[lanes, 3], up)
        seg = (np.arange(len(lanes)) & ~7) + 3
        np.testing.assert_array_equal(out[lanes, 4], xv[seg].astype(np.uint32))
        assert (out[lanes, 5] == full).all()


def test_full_mask_on_partial_warp_is_reported(lib):
    out = np.zeros(16, np.float32)
    simt.clear_error(lib)
    rc = lib.st_full_mask_partial(P(out))
    assert rc != 0
    msg = simt.last_error(lib)
    assert "do not exist" in msg and "__shfl_xor_sync" in msg
    simt.clear_error(lib)


# ---------------------------------------------------------------- deadlocks / errors
def test_divergent_barrier_deadlock_reported(lib):
    out = np.zeros(128, np.int32)
    with pytest.raises(simt.SimtError) as ei:
        simt.call(lib, "st_divergent_barrier", P(out), seed=1)
    msg = str(ei.value)
    assert "SIMT deadlock" in msg
    assert "divergent_barrier_kernel" in msg
    assert "threads 0-15" in msg and "selftest.cu" in msg
    assert "block (" in msg
    # the error is sticky until cleared, like a CUDA launch failure; check() cleared it
    assert simt.last_error(lib) is None
    # the harness recovers: a following correct launch works
    x = np.ones(64, np.float32)
    o = np.zeros(1, np.float32)
    simt.call(lib, "st_block_sum", P(x), P(o), I(64), I(64), I(0))
    assert o[0] == 64


def test_shuffle_with_exited_lane_deadlock_reported(lib):
    out = np.zeros(32, np.float32)
    with pytest.raises(simt.SimtError) as ei:
        simt.call(lib, "st_shfl_exited", P(out), seed=2)
    msg = str(ei.value)
    assert "SIMT deadlock" in msg and "__shfl_xor_sync(mask=0xffffffff)" in msg
    assert "threads 5: exited" in msg


def test_sticky_error_blocks_later_launches(lib):
    out = np.zeros(128, np.int32)
    simt.clear_error(lib)
    assert lib.st_divergent_barrier(P(out)) != 0
    x = np.ones(64, np.float32)
    o = np.zeros(1, np.float32)
    assert lib.st_block_sum(P(x), P(o), I(64), I(64), I(0)) != 0  # skipped: sticky error
    assert o[0] == 0
    simt.clear_error(lib)


def test_deadlock_in_subprocess_does_not_hang(lib, tmp_path):
    # the same failure seen from a fresh process: message on stderr, no hang
    code = textwrap.dedent(f"""
        import ctypes, sys
        sys.path.insert(0, {str(HERE)!r})
        import harness as simt
        lib = simt.build(sources=[{str(HERE / 'kernels' / 'selftest.cu')!r}], driver_source={DRIVER!r}, name="selftest",
                         sanitize=False)
        buf = (ctypes.c_int * 128)()
        rc = lib.st_divergent_barrier(buf)
        sys.exit(3 if rc else 0)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 3, r.stderr
    assert "SIMT deadlock" in r.stderr


def test_early_exit_threads_leave_barrier(lib):
    x = np.arange(64, dtype=np.float32)
    out = np.full(64, -1, np.float32)
    simt.call(lib, "st_early_exit", P(x), P(out), I(40), I(64), seed=3)
    np.testing.assert_array_equal(out[:40], x[:40][::-1])
    assert (out[40:] == -1).all()


def test_trap_reported(lib):
    out = np.zeros(64, np.int32)
    with pytest.raises(simt.SimtError, match=r"__trap\(\).*thread \(7,0,0\)"):
        simt.call(lib, "st_trap", P(out))


def test_device_assert_reported(lib):
    out = np.zeros(8, np.int32)
    simt.clear_error(lib)
    assert lib.st_assert(P(out)) == 710  # cudaErrorAssert
    msg = simt.last_error(lib)
    assert "assert(threadIdx.x != 3) failed" in msg and "assert_kernel" in msg
    simt.clear_error(lib)


def test_bad_launch_config(lib):
    out = np.zeros(4096, np.float32)
    simt.clear_error(lib)
    rc = lib.st_bad_config(P(out))
    assert rc == 9  # cudaErrorInvalidConfiguration
    assert lib.simt_last_error_code() == 0  # cudaGetLastError() reset it (not sticky)


# ---------------------------------------------------------------- shared memory, templates, indexing
@pytest.mark.parametrize("block", [64, 100])
def test_dynamic_shared_memory(lib, block):
    n = 1000
    x = np.arange(n, dtype=np.float32)
    y = np.zeros(n, np.float32)
    simt.call(lib, "st_reverse_dyn", P(x), P(y), I(n), I(block), seed=5)
    ref = np.concatenate([x[b:b + block][::-1] for b in range(0, n, block)])
    np.testing.assert_array_equal(y, ref)

    out = np.zeros(48, np.int32)
    simt.call(lib, "st_dyn_two", P(out), I(48))
    np.testing.assert_array_equal(out, 3 * (47 - np.arange(48)))


def test_large_dynamic_smem_needs_attribute(lib):
    n = 512
    x = np.arange(n, dtype=np.float32)
    y = np.zeros(n, np.float32)
    simt.clear_error(lib)
    assert lib.st_big_dyn(P(x), P(y), I(n), I(0)) == 1  # cudaErrorInvalidValue
    simt.clear_error(lib)
    assert simt.call(lib, "st_big_dyn", P(x), P(y), I(n), I(1)) == 0
    np.testing.assert_array_equal(y, np.concatenate([x[:256][::-1], x[256:][::-1]]))


def test_templated_kernels_and_2d_indexing(lib):
    n = 300
    xf = np.arange(n, dtype=np.float32)
    xi = np.arange(n, dtype=np.int32)
    simt.call(lib, "st_scale", P(xf), P(xi), I(n))
    np.testing.assert_array_equal(xf, 3 * np.arange(n, dtype=np.float32))
    np.testing.assert_array_equal(xi, 5 * np.arange(n, dtype=np.int32))
    w, h = 37, 21
    out = np.full(w * h, -1, np.int32)
    simt.call(lib, "st_index2d", P(out), I(w), I(h))
    yy, xx = np.mgrid[0:h, 0:w]
    np.testing.assert_array_equal(out, (yy * 1000 + xx).ravel())


def test_syncthreads_count_and_or(lib):
    x = np.array([1, 0, 2, 3] * 24 + [1, 2, 3], np.int32)  # 99 threads
    out = np.zeros(3, np.int32)
    simt.call(lib, "st_syncthreads_count", P(x), P(out), I(len(x)))
    assert out.tolist() == [int((x > 0).sum()), 0, 1]


# ---------------------------------------------------------------- bf16 / half
def test_bf16_half_conversion_bit_exact(lib):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, size=200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x00000001, 0x007FFFFF, 0x3F808000, 0x3F818000,
                        0x3F80C000, 0x477FEFFF, 0x477FF000, 0x47800000, 0x33000000, 0x33000001, 0x387FC000,
                        0x38800000, 0x7F7FFFFF, 0x7F7F8000], np.uint32)
    vals = np.concatenate([bits.view(np.float32), special.view(np.float32),
                           rng.standard_normal(10000).astype(np.float32) * 1000,
                           rng.standard_normal(10000).astype(np.float32) * 1e-5])
    n = len(vals)
    bf = np.zeros(n, np.uint16)
    hf = np.zeros(n, np.uint16)
    bfb = np.zeros(n, np.float32)
    hfb = np.zeros(n, np.float32)
    simt.call(lib, "st_convert", P(vals), P(bf), P(hf), P(bfb), P(hfb), I(n))
    t = torch.from_numpy(vals)
    tbf = t.to(torch.bfloat16)
    thf = t.to(torch.float16)
    ref_bf = tbf.view(torch.int16).numpy().view(np.uint16)
    ref_hf = thf.view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(vals)
    np.testing.assert_array_equal(bf[~nan], ref_bf[~nan])
    np.testing.assert_array_equal(hf[~nan], ref_hf[~nan])
    # NaN -> canonical NaN as on the GPU
    assert (bf[nan] == 0x7FFF).all() and (hf[nan] == 0x7FFF).all()
    np.testing.assert_array_equal(bfb[~nan], tbf.float().numpy()[~nan])
    np.testing.assert_array_equal(hfb[~nan], thf.float().numpy()[~nan])


# ---------------------------------------------------------------- atomics
def test_atomics(lib):
    rng = np.random.default_rng(1)
    n = 5000
    keys = rng.integers(0, 40, size=n).astype(np.int32)
    vals = rng.integers(-8, 8, size=n).astype(np.float32)
    hist = np.zeros(40, np.int32)
    fsum = np.zeros(1, np.float32)
    imax = np.array([-(2**31)], np.int32)
    imin = np.array([2**31 - 1], np.int32)
    bits = np.zeros(1, np.uint32)
    u64 = np.zeros(1, np.uint64)
    cas = np.zeros(1, np.int32)
    last = np.full(1, -1, np.int32)
    simt.call(lib, "st_atomics", P(keys), P(vals), I(n), P(hist), P(fsum), P(imax), P(imin), P(bits), P(u64), P(cas),
              P(last), seed=11)
    np.testing.assert_array_equal(hist, np.bincount(keys, minlength=40))
    assert fsum[0] == vals.sum()
    assert imax[0] == keys.max() * 3 - 7 and imin[0] == keys.min() * 3 - 7
    assert bits[0] == np.bitwise_or.reduce((1 << (keys & 31)).astype(np.uint32))
    assert int(u64[0]) == int((keys.astype(np.uint64) << np.uint64(33)).sum())
    assert cas[0] == n
    assert 0 <= last[0] < n


# ---------------------------------------------------------------- misc
def test_seed_changes_order_but_is_reproducible(lib):
    def run(seed):
        out = np.zeros(32, np.int32)
        simt.call(lib, "st_warp_exchange", P(out), I(0), seed=seed)
        return out.tolist()

    assert run(5) == run(5)
    assert len({tuple(run(s)) for s in range(6)}) > 1


def test_build_cache_and_rebuild(tmp_path):
    # kernel in a header (extern __shared__ + launch) included through a relative path
    (tmp_path / "inc").mkdir()
    (tmp_path / "src").mkdir()
    hdr = tmp_path / "inc" / "k.cuh"
    hdr_text = """#pragma once
#define K {k}
template <int M> __global__ void k(int* p) {{
  extern __shared__ int dyn[];
  __shared__ int st[4];
  dyn[threadIdx.x] = K * M; st[threadIdx.x] = 1;
  __syncthreads();
  p[threadIdx.x] = dyn[3 - threadIdx.x] + st[3 - threadIdx.x] - 1;
}}
inline void launch_k(int* p) {{ k<1><<<1, 4, 4 * sizeof(int)>>>(p); }}
"""
    hdr.write_text(hdr_text.format(k=2))
    src = tmp_path / "src" / "k.cu"
    src.write_text('#include "../inc/k.cuh"\nextern "C" void run(int* p){ launch_k(p); }\n')
    lib1 = simt.build(sources=[src], include_dirs=[tmp_path / "inc"], name="cachetest", build_dir=tmp_path / "b",
                      sanitize=False)
    out = np.zeros(4, np.int32)
    lib1.run(P(out))
    simt.check(lib1)
    assert out.tolist() == [2] * 4
    t = time.time()
    lib2 = simt.build(sources=[src], include_dirs=[tmp_path / "inc"], name="cachetest", build_dir=tmp_path / "b",
                      sanitize=False)
    assert lib2 is lib1 and time.time() - t < 1.0
    hdr.write_text(hdr_text.format(k=7))  # header change -> rebuild
    lib3 = simt.build(sources=[src], include_dirs=[tmp_path / "inc"], name="cachetest", build_dir=tmp_path / "b",
                      sanitize=False)
    lib3.run(P(out))
    simt.check(lib3)
    assert out.tolist() == [7] * 4


def test_namespace_scope_extern_shared_and_rewrite(tmp_path):
    src = tmp_path / "ns.cu"
    src.write_text(textwrap.dedent("""
        extern __shared__ float gsm[];   // at namespace scope
        template <int N> __global__ void k(float* out) {
          gsm[threadIdx.x] = threadIdx.x * N;
          __syncthreads();
          out[threadIdx.x] = gsm[blockDim.x - 1 - threadIdx.x];  // k<<<not a launch>>>
        }
        extern "C" int run(float* out, int n) {
          const char* s = "k<<<1,1>>>()";
          (void)s;
          k<2><<<1, n, n * sizeof(float)>>>(out);
          return (int)cudaGetLastError();
        }
    """))
    lib = simt.build(sources=[src], name="nstest", build_dir=tmp_path / "b", sanitize=False)
    out = np.zeros(40, np.float32)
    assert simt.call(lib, "run", P(out), I(40)) == 0
    np.testing.assert_array_equal(out, 2 * (39 - np.arange(40, dtype=np.float32)))


def test_speed(lib):
    blocks, block, iters = 4, 256, 200
    out = np.zeros(blocks * block, np.float32)
    simt.set_seed(lib, 0)
    t = time.perf_counter()
    simt.call(lib, "st_barrier_loop", P(out), I(blocks), I(block), I(iters))
    dt = time.perf_counter() - t
    per = dt / (blocks * block * iters) * 1e6
    print(f"\nSIMT: {per:.3f} us per thread per barrier")
    assert per < 20.0
