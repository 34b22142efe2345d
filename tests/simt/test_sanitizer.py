"""The emulator's memory checker (harness.build(sanitize=True)): planted defects are reported by
name (kind, kernel, block, thread, address, size, buffer), their correct twins pass, and the
per-launch counters give the textbook costs of known access patterns."""
from __future__ import annotations

import ctypes
import re
import sys
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

I = ctypes.c_int
P = simt.ptr


@pytest.fixture(scope="module")
def defects():
    lib = simt.build(sources=[HERE / "kernels" / "defects.cu"], name="defects", sanitize=True)
    simt.set_checks(lib, memcheck=True, racecheck=True, counters=False, initcheck=True)
    simt.clear_error(lib)
    return lib


@pytest.fixture(scope="module")
def patterns():
    lib = simt.build(sources=[HERE / "kernels" / "patterns.cu"], name="patterns", sanitize=True)
    simt.set_checks(lib, counters=True)
    simt.reset_counters(lib)
    yield lib
    simt.set_checks(lib, counters=False)


def raises(lib, fn, *args, seed=0, order="random") -> str:
    simt.set_order(lib, order)
    try:
        with pytest.raises(simt.SimtError) as ei:
            simt.call(lib, fn, *args, seed=seed)
    finally:
        simt.set_order(lib, "random")
    return str(ei.value)


# ---------------------------------------------------------------- memcheck
def test_out_of_bounds_write_is_reported_by_name(defects):
    out = np.zeros(100, np.float32)
    assert simt.call(defects, "df_fill", P(out, "out"), I(100), I(0)) == 0
    assert (out == 1).all()
    msg = raises(defects, "df_fill", P(out, "out"), I(100), I(1), order="fifo")
    assert msg.startswith("SIMT memcheck: invalid write of 4 bytes")
    assert "kernel 'defects::fill_kernel'" in msg
    # element 100 = block 1 (64 threads per block), thread 36
    assert "block (1,0,0) thread (36,0,0)" in msg
    assert re.search(r"address 0x[0-9a-f]+, 4 bytes, 0 bytes after the end of the nearest buffer, global "
                     r"'df_fill arg 0: out \(float32\[100\]\)'", msg)
    assert "defects.cu:" in msg  # the instruction, symbolized to its source line


def test_out_of_bounds_error_is_a_device_fault(defects):
    out = np.zeros(100, np.float32)
    simt.clear_error(defects)
    assert defects.df_fill(P(out), I(100), I(1)) == 700  # cudaErrorIllegalAddress, sticky
    simt.clear_error(defects)


def test_misaligned_16_byte_load_is_reported_by_name(defects):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(32, np.float32)
    assert simt.call(defects, "df_vec_copy", P(x, "x"), I(4), I(8), P(out, "out")) == 0
    np.testing.assert_array_equal(out, x[4:36])
    # rows starting 8 bytes into a 16-byte aligned buffer: fine on x86, a fault on a GPU
    msg = raises(defects, "df_vec_copy", P(x, "x"), I(2), I(8), P(out, "out"), order="fifo")
    assert msg.startswith("SIMT memcheck: misaligned global 16-byte read (the address is not a multiple of 16)")
    assert "kernel 'defects::vec_copy_kernel'" in msg and "block (0,0,0) thread (0,0,0)" in msg
    assert re.search(r"16 bytes at offset 8 of global buffer 'df_vec_copy arg 0: x \(float32\[64\]\)'", msg)
    simt.clear_error(defects)
    regs = [simt.register(defects, x, "x"), simt.register(defects, out, "out")]
    try:
        assert defects.df_vec_copy(P(x), I(2), I(8), P(out)) == 716  # cudaErrorMisalignedAddress
    finally:
        for lo in regs:
            simt.unregister(defects, lo)
    simt.clear_error(defects)


def test_unregistered_memory_is_an_invalid_address(defects):
    out = np.zeros(100, np.float32)
    # a raw address (not a simt.ptr): the launch was never told the kernel may touch it
    msg = raises(defects, "df_fill", ctypes.c_void_p(out.ctypes.data), I(100), I(0))
    assert "SIMT memcheck: invalid write of 4 bytes (outside every buffer of the launch)" in msg
    assert "no buffer is registered" in msg


# ---------------------------------------------------------------- initcheck
# df_scratch_load's ways to fill its cudaMalloc scratch before load_kernel reads it (defects.cu)
FILL_NOTHING, FILL_STORE_KERNEL, FILL_ATOMIC_KERNEL, FILL_MEMSET, FILL_MEMSET_HALF, FILL_MEMCPY = range(6)
LAUNCH_FAILURE = 719  # cudaErrorLaunchFailure


def test_read_of_unwritten_cudamalloc_memory_is_reported_by_name(defects):
    x = np.arange(100, dtype=np.float32)
    out = np.zeros(100, np.float32)
    msg = raises(defects, "df_scratch_load", P(x, "x"), I(100), I(FILL_NOTHING), P(out, "out"), order="fifo")
    assert msg.startswith("SIMT initcheck: Uninitialized __global__ memory read of size 4 bytes")
    assert "in kernel 'defects::load_kernel'" in msg
    assert "by block (0,0,0) thread (0,0,0)" in msg
    assert re.search(r"address 0x[0-9a-f]+, 4 bytes at offset 0 of global buffer 'cudaMalloc\(400\)'", msg)
    assert "4 of the bytes read were never written since the allocation, the first at offset 0" in msg
    assert "defects.cu:" in msg  # the load, symbolized to its source line
    assert (out == 0).all()  # the launch stopped at the first report


def test_uninitialized_read_fails_the_launch_like_memcheck(defects):
    x = np.ones(64, np.float32)
    out = np.zeros(64, np.float32)
    regs = [simt.register(defects, x, "x"), simt.register(defects, out, "out")]
    try:
        simt.clear_error(defects)
        assert defects.df_scratch_load(P(x), I(64), I(FILL_NOTHING), P(out)) == LAUNCH_FAILURE  # sticky
        assert "SIMT initcheck: " in simt.last_error(defects)
        assert defects.df_scratch_load(P(x), I(64), I(FILL_MEMSET), P(out)) == LAUNCH_FAILURE  # still sticky
    finally:
        for lo in regs:
            simt.unregister(defects, lo)
    simt.clear_error(defects)


@pytest.mark.parametrize("seed", [0, 1])
def test_a_store_before_the_barrier_initializes_the_scratch(defects, seed):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    assert simt.call(defects, "df_stage_rotate", P(x, "x"), I(64), I(0), P(out, "out"), seed=seed) == 0
    np.testing.assert_array_equal(out, np.roll(x, -1))
    # the last thread's store missing: only thread 62 reads a byte nothing wrote, whatever the order
    msg = raises(defects, "df_stage_rotate", P(x, "x"), I(64), I(1), P(out, "out"), seed=seed)
    assert msg.startswith("SIMT initcheck: Uninitialized __global__ memory read of size 4 bytes")
    assert "in kernel 'defects::stage_rotate_kernel' by block (0,0,0) thread (62,0,0)" in msg
    assert "4 bytes at offset 252 of global buffer 'cudaMalloc(256)'" in msg


@pytest.mark.parametrize("fill", [FILL_STORE_KERNEL, FILL_ATOMIC_KERNEL, FILL_MEMSET, FILL_MEMCPY],
                         ids=["earlier-launch", "atomics", "memset", "memcpy"])
def test_written_scratch_is_clean(defects, fill):
    x = np.arange(1, 101, dtype=np.float32)
    out = np.full(100, np.nan, np.float32)
    assert simt.call(defects, "df_scratch_load", P(x, "x"), I(100), I(fill), P(out, "out")) == 0
    np.testing.assert_array_equal(out, 0 if fill == FILL_MEMSET else x)


def test_initcheck_tracks_bytes_not_buffers(defects):
    x = np.arange(100, dtype=np.float32)
    out = np.zeros(100, np.float32)
    # a memset of the first half: the first float of the second half is the first unwritten read
    msg = raises(defects, "df_scratch_load", P(x, "x"), I(100), I(FILL_MEMSET_HALF), P(out, "out"), order="fifo")
    assert "by block (0,0,0) thread (50,0,0)" in msg
    assert "4 bytes at offset 200 of global buffer 'cudaMalloc(400)'" in msg


def test_read_of_a_buffer_registered_uninitialized_is_reported(defects):
    src = np.full(64, 3.0, np.float32)  # content a GPU would not promise: at::empty's
    out = np.zeros(64, np.float32)
    assert simt.call(defects, "df_load", P(src, "src"), I(64), P(out, "out")) == 0
    np.testing.assert_array_equal(out, src)
    msg = raises(defects, "df_load", P(src, "src", uninitialized=True), I(64), P(out, "out"), order="lifo")
    assert msg.startswith("SIMT initcheck: Uninitialized __global__ memory read of size 4 bytes")
    assert "in kernel 'defects::load_kernel' by block (0,0,0) thread (63,0,0)" in msg
    assert "4 bytes at offset 252 of global buffer 'df_load arg 0: src (float32[64])'" in msg
    # a registration lasts one call: the next one starts unwritten again
    raises(defects, "df_load", P(src, "src", uninitialized=True), I(64), P(out, "out"))
    # the same by hand
    lo = simt.register(defects, src, "scratch", uninitialized=True)
    try:
        raises(defects, "df_load", ctypes.c_void_p(src.ctypes.data), I(64), P(out, "out"))
    finally:
        simt.unregister(defects, lo)


def test_registered_buffers_have_content(defects):
    src = np.empty(64, np.float32)  # whatever the host memory held: still content to the emulator
    out = np.zeros(64, np.float32)
    assert simt.call(defects, "df_load", P(src, "src"), I(64), P(out, "out")) == 0
    np.testing.assert_array_equal(out, src)
    # registered with content over an uninitialized registration of the same memory: the bytes
    # both cover have content (here the first half only), whichever came first
    lo = simt.register(defects, src.ctypes.data, "first half", nbytes=32 * 4)
    try:
        msg = raises(defects, "df_load", P(src, "scratch", uninitialized=True), I(64), P(out, "out"), order="fifo")
        assert "by block (0,0,0) thread (32,0,0)" in msg and "4 bytes at offset 128 of global buffer" in msg
    finally:
        simt.unregister(defects, lo)
    lo = simt.register(defects, src, "scratch", uninitialized=True)
    try:
        assert simt.call(defects, "df_load", P(src, "src"), I(64), P(out, "out")) == 0
    finally:
        simt.unregister(defects, lo)


def test_initcheck_can_be_switched_off(defects):
    x = np.arange(64, dtype=np.float32)
    out = np.zeros(64, np.float32)
    assert simt.get_checks(defects)["initcheck"]  # on by default
    simt.set_checks(defects, initcheck=False)
    try:
        assert simt.call(defects, "df_scratch_load", P(x), I(64), I(FILL_NOTHING), P(out)) == 0
        assert not simt.get_checks(defects)["initcheck"]
    finally:
        simt.set_checks(defects, initcheck=True)
    raises(defects, "df_scratch_load", P(x), I(64), I(FILL_NOTHING), P(out))


# ---------------------------------------------------------------- racecheck
def test_lost_update_is_reported_by_name(defects):
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 40, 1000).astype(np.int32)
    hist = np.zeros((2, 40), np.int32)
    for seed in (0, 1, 2):  # whatever the order: the plain += is a race even where the sum is right
        assert simt.call(defects, "df_histogram", P(keys, "keys"), I(1000), I(40), I(1), P(hist, "hist"), I(2),
                         seed=seed) == 0
        np.testing.assert_array_equal(hist.sum(0), np.bincount(keys, minlength=40))
        msg = raises(defects, "df_histogram", P(keys, "keys"), I(1000), I(40), I(0), P(hist, "hist"), I(2), seed=seed)
        assert msg.startswith("SIMT racecheck: ")
        assert "hazard on shared memory in kernel 'defects::histogram_kernel'" in msg
        assert re.search(r"(read|write) of 4 bytes by block \(\d,0,0\) thread \(\d+,0,0\)", msg)
        assert re.search(r"races with a (read|write) by .*thread \(\d+,0,0\)", msg)
        assert "of shared buffer '__shared__ counts'" in msg


def test_plain_writes_of_two_blocks_to_one_address_race(defects):
    x = np.ones(4 * 32, np.float32)
    total = np.zeros(4, np.float32)
    assert simt.call(defects, "df_block_total", P(x, "x"), I(32), I(4), I(0), P(total, "total")) == 0
    np.testing.assert_array_equal(total, 32)
    msg = raises(defects, "df_block_total", P(x, "x"), I(32), I(4), I(1), P(total, "total"))
    assert "write-write hazard on global memory in kernel 'defects::block_total_kernel'" in msg
    assert "two blocks of one launch are never ordered" in msg
    assert "offset 0 of global buffer 'df_block_total arg 4: total (float32[4])'" in msg


def test_a_shuffle_does_not_order_memory(defects):
    out = np.zeros(32, np.int32)
    msg = raises(defects, "df_shuffle_ordered", P(out, "out"))
    assert "hazard on shared memory in kernel 'defects::shuffle_ordered_kernel'" in msg
    simt.set_checks(defects, any_collective_orders=True)  # the looser reading: every collective orders
    try:
        assert simt.call(defects, "df_shuffle_ordered", P(out, "out")) == 0
    finally:
        simt.set_checks(defects, any_collective_orders=False)
    np.testing.assert_array_equal(out, (np.arange(32) + 1) % 32 * 10)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_last_block_finishes_orders_blocks_through_fence_and_atomic(defects, seed):
    # The release/acquire pair every "last block finishes" reduction needs: a fence before the
    # ticket and one after it. Blocks run in a random order; the last ticket adds every partial.
    x = np.arange(6 * 32, dtype=np.float32)
    partials = np.zeros(6, np.float32)
    counter = np.zeros(1, np.uint32)
    total = np.zeros(1, np.float32)
    args = (P(x, "x"), I(32), I(6))
    tail = (P(partials, "partials"), P(counter, "counter"), P(total, "total"))
    assert simt.call(defects, "df_last_block_sum", *args, I(0), *tail, seed=seed) == 0
    assert total[0] == x.sum() and counter[0] == 0  # atomicInc wrapped the counter back to zero
    for broken, what in ((1, "release"), (2, "acquire")):
        msg = raises(defects, "df_last_block_sum", *args, I(broken), *tail, seed=seed)
        assert "hazard on global memory in kernel 'defects::last_block_sum_kernel'" in msg, what
        assert "two blocks of one launch are never ordered" in msg
        assert "global buffer 'df_last_block_sum arg 4: partials" in msg
        simt.clear_error(defects)
        counter[0] = 0


def test_racecheck_can_be_switched_off(defects):
    keys = np.zeros(64, np.int32)
    hist = np.zeros(40, np.int32)
    simt.set_checks(defects, racecheck=False)
    try:
        assert simt.call(defects, "df_histogram", P(keys), I(64), I(40), I(0), P(hist), I(1)) == 0
    finally:
        simt.set_checks(defects, racecheck=True)
    assert hist[0] == 64  # the emulator's scheduler alone never interleaves a read-modify-write


def test_selftest_races_are_caught_for_every_seed():
    # The emulator's own broken self-test kernels (missing __syncthreads / __syncwarp) give wrong
    # results only for some thread orders; with the checker every seed reports them.
    driver = r"""
    namespace selftest { void launch_block_sum(const float*, float*, int, int, bool, cudaStream_t); }
    extern "C" int st_block_sum(const float* x, float* out, int n, int block, int broken) {
      selftest::launch_block_sum(x, out, n, block, broken != 0, nullptr);
      return (int)cudaGetLastError();
    }
    """
    lib = simt.build(sources=[HERE / "kernels" / "selftest.cu"], driver_source=driver, name="selftest_sanitized",
                     sanitize=True)
    x = np.ones(1024, np.float32)
    for seed in range(3):
        out = np.zeros(4, np.float32)
        assert simt.call(lib, "st_block_sum", P(x), P(out), I(1024), I(256), I(0), seed=seed) == 0
        msg = raises(lib, "st_block_sum", P(x), P(out), I(1024), I(256), I(1), seed=seed)
        assert "hazard on shared memory in kernel 'block_sum_broken_kernel'" in msg
        out2 = np.zeros(32, np.int32)
        assert simt.call(lib, "st_warp_exchange", P(out2), I(1), seed=seed) == 0
        np.testing.assert_array_equal(out2, (np.arange(32) + 1) % 32 * 10)
        msg = raises(lib, "st_warp_exchange", P(out2), I(0), seed=seed)
        assert "hazard on shared memory in kernel 'warp_exchange_kernel'" in msg
        assert "two lanes of one warp with no __syncthreads or __syncwarp of both between them" in msg


# ---------------------------------------------------------------- counters
def aligned(values: np.ndarray, align: int = 256) -> np.ndarray:
    """A copy of values starting on an `align`-byte boundary, like a cudaMalloc allocation (sector
    counts depend on where a buffer starts)."""
    raw = np.zeros(values.nbytes + align, np.uint8)
    off = (-raw.ctypes.data) % align
    out = raw[off:off + values.nbytes].view(values.dtype).reshape(values.shape)
    out[...] = values
    return out


def launch_of(records, name):
    hits = [r for r in records if name in r["name"]]
    assert len(hits) == 1, records
    return hits[0]


@pytest.mark.parametrize("stride,sectors", [(1, 4), (2, 8), (8, 32), (100, 32)])
def test_counters_global_sectors_per_request(patterns, stride, sectors):
    n = 256
    x = aligned(np.arange(n * stride, dtype=np.float32))
    y = aligned(np.zeros(n, np.float32))
    simt.reset_counters(patterns)
    assert simt.call(patterns, "pt_gather", P(x), I(stride), I(n), P(y)) == 0
    np.testing.assert_array_equal(y, x[::stride][:n])
    rec = launch_of(simt.counters(patterns), "gather_kernel")
    warps = n // 32
    assert rec["global_load"]["requests"] == warps
    assert rec["global_load"]["sectors"] == warps * sectors
    assert rec["global_load"]["ideal_sectors"] == warps * 4
    assert rec["global_store"]["sectors"] == warps * 4
    # first touch: each loaded sector once (strides of 8+ floats use one sector per element)
    assert rec["dram_read"] == warps * sectors * 32
    assert rec["dram_write"] == n * 4
    assert rec["max_warp_global_loads"] == 1


def test_counters_vector_loads(patterns):
    n = 64
    x = aligned(np.arange(4 * n, dtype=np.float32))
    y = aligned(np.zeros(4 * n, np.float32))
    simt.reset_counters(patterns)
    assert simt.call(patterns, "pt_vec4", P(x), I(n), P(y)) == 0
    np.testing.assert_array_equal(y, x)
    rec = launch_of(simt.counters(patterns), "vec4_kernel")
    assert rec["global_load"]["requests"] == 2 and rec["global_load"]["sectors"] == 2 * 16
    assert rec["global_load"]["bytes"] == 4 * 4 * n and rec["dram_read"] == 4 * 4 * n


@pytest.mark.parametrize("stride,degree", [(1, 1), (33, 1), (2, 2), (4, 4), (32, 32), (0, 1)])
def test_counters_shared_bank_conflicts(patterns, stride, degree):
    out = np.zeros(32, np.float32)
    simt.reset_counters(patterns)
    assert simt.call(patterns, "pt_bank", I(stride), P(out)) == 0
    np.testing.assert_array_equal(out, np.arange(32) if stride else np.zeros(32))
    rec = launch_of(simt.counters(patterns), "bank_kernel")
    load = rec["shared_load"]
    assert load["requests"] == 1 and load["ideal_wavefronts"] == 1
    assert load["wavefronts"] == degree
    assert rec["static_smem"] == 32 * 33 * 4


@pytest.mark.parametrize("stride,wavefronts", [(1, 4), (2, 8)])
def test_counters_shared_vector_phases(patterns, stride, wavefronts):
    out = np.zeros(4 * 32, np.float32)
    simt.reset_counters(patterns)
    assert simt.call(patterns, "pt_bank_vec4", I(stride), P(out)) == 0
    rec = launch_of(simt.counters(patterns), "bank_vec4_kernel")
    load = rec["shared_load"]
    assert load["requests"] == 1 and load["ideal_wavefronts"] == 4
    assert load["wavefronts"] == wavefronts


def test_launched_kernels_name_instantiations(defects):
    out = np.zeros(8, np.float32)
    simt.call(defects, "df_fill", P(out), I(8), I(0))
    launched = simt.launched_kernels(defects)
    assert any(name.startswith("defects::fill_kernel(") for name in launched)
    assert set(launched) <= simt.kernel_instantiations(defects)
    assert len(simt.kernel_instantiations(defects)) == 10


def test_counters_warp_collectives_in_mio_instructions(patterns):
    # 5 float shuffles (1 instruction each) + 5 double shuffles (2 each) per warp
    x = np.ones(64, np.float32)
    out = np.zeros(2, np.float32)
    simt.reset_counters(patterns)
    assert simt.call(patterns, "pt_shuffles", P(x), P(out), I(2)) == 0
    np.testing.assert_array_equal(out, 64)
    rec = launch_of(simt.counters(patterns), "shuffles_kernel")
    assert rec["collectives"] == 2 * (5 + 5 * 2)


def test_counters_record_a_memset_as_a_launch(patterns):
    buf = aligned(np.ones(100, np.float32))
    y = aligned(np.ones(100, np.float32))
    simt.reset_counters(patterns)
    assert simt.call(patterns, "pt_memset_then_gather", P(buf), I(100), P(y)) == 0
    assert (y == 0).all()
    recs = simt.counters(patterns)
    assert [r["memset"] for r in recs] == [True, False]
    assert recs[0]["name"] == "cudaMemsetAsync" and recs[0]["dram_write"] == 416  # 400 bytes in sectors
