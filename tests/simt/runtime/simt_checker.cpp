// The memory checker's front: every load and store of a sanitize=True kernel arrives here (through
// simt_tsan.cpp) with its address, size and instruction. Local memory (the fiber's stack) and the
// built-in variables are skipped; everything else must lie inside one region the launch may touch
// (memcheck: out-of-bounds / unregistered addresses fault like on a GPU) and be aligned to its size
// (8- and 16-byte vector accesses fault otherwise), then goes to initcheck (global memory whose
// content started undefined), racecheck and the counters.
#include "simt_internal.h"

#include <stdlib.h>

#include <string>

extern "C" const char __start_simt_special[];  // threadIdx, blockIdx, blockDim, gridDim
extern "C" const char __stop_simt_special[];

namespace simt {
namespace rt {

Exec g_exec;
Checks g_checks;

namespace {

const uintptr_t g_special_lo = reinterpret_cast<uintptr_t>(__start_simt_special);
const uintptr_t g_special_size =
    reinterpret_cast<uintptr_t>(__stop_simt_special) - reinterpret_cast<uintptr_t>(__start_simt_special);

const char* space_word(Space s) { return s == kGlobal ? "global" : (s == kParam ? "parameter" : "shared"); }

[[noreturn]] void memcheck_fail(cudaError_t code, const std::string& what, uintptr_t p, unsigned size,
                                const void* pc) {
  fail_kernel(code, "SIMT memcheck: " + what + " in kernel '" + std::string(g_exec.desc ? g_exec.desc->name : "?") +
                        "' by " + describe_thread() + ": " + describe_address(p, size) + " (" + describe_pc(pc) +
                        ")\n  in " + where_now());
}

bool env_flag(const char* name, bool dflt) {
  const char* e = getenv(name);
  return e ? atoi(e) != 0 : dflt;
}

struct LoadEnv {
  LoadEnv() {
    g_checks.memcheck = env_flag("SIMT_MEMCHECK", true);
    g_checks.racecheck = env_flag("SIMT_RACECHECK", true);
    g_checks.counters = env_flag("SIMT_COUNTERS", false);
    g_checks.initcheck = env_flag("SIMT_INITCHECK", true);
    g_checks.any_collective_orders = env_flag("SIMT_RACE_ANY_COLLECTIVE", false);
  }
} load_env;

}  // namespace

void on_access(const void* a, unsigned size, unsigned flags, const void* pc) {
  const Exec& e = g_exec;
  if (!e.checking) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(a);
  if (p - e.stack_lo < e.stack_size) return;  // local memory (registers / the stack frame)
  if (p - g_special_lo < g_special_size) return;  // threadIdx & co: special registers
  Region* r = find_region(p);
  if (r == nullptr) {
    if (in_module(p)) return;
    if (!g_checks.memcheck) return;
    memcheck_fail(cudaErrorIllegalAddress,
                  fmt("invalid %s of %u bytes (outside every buffer of the launch)",
                      (flags & kWrite) ? "write" : "read", size),
                  p, size, pc);
  }
  if (r->space == kParam) {
    if (g_checks.memcheck && (flags & kWrite)) memcheck_fail(cudaErrorIllegalAddress, "write to the kernel's parameters", p, size, pc);
    return;
  }
  if (g_checks.memcheck) {
    if (p + size > r->hi)
      memcheck_fail(cudaErrorIllegalAddress,
                    fmt("out-of-bounds %s %s of %u bytes", space_word(r->space), (flags & kWrite) ? "write" : "read",
                        size),
                    p, size, pc);
    if (!(flags & kUnaligned) && size <= 16 && (size & (size - 1)) == 0 && (p & (size - 1)) != 0)
      memcheck_fail(cudaErrorMisalignedAddress,
                    fmt("misaligned %s %u-byte %s (the address is not a multiple of %u)", space_word(r->space), size,
                        (flags & kWrite) ? "write" : "read", size),
                    p, size, pc);
  }
  if (!r->init.empty()) init_access(*r, p, size, flags, pc);
  if (g_checks.racecheck && r->racecheck) {
    if (flags & kAtomic) {
      if (r->space == kGlobal) race_atomic(p, flags & kWrite);  // release / acquire between blocks
    } else {
      race_access(*r, p, size, flags, pc);
    }
  }
  if (g_checks.counters) count_access(*r, p, size, flags, pc);
}

void on_launch_begin(const LaunchDesc& d, unsigned nthreads, void* dyn_smem, size_t dyn_bytes) {
  g_exec.in_kernel = true;
  g_exec.nthreads = nthreads;
  g_exec.desc = &d;
  g_exec.checking = g_checks.memcheck || g_checks.racecheck || g_checks.counters || g_checks.initcheck;
  set_launch_regions(dyn_smem, dyn_bytes, d.data, d.data_size);
  if (g_checks.racecheck) race_launch_begin();
  if (g_checks.counters) counters_launch_begin(d, nthreads, dyn_bytes);
}

void on_block_begin() {
  if (g_checks.racecheck) race_block_begin();
}

void on_barrier() {
  if (g_checks.racecheck) race_barrier();
}

void on_warp_sync(unsigned warp_base, unsigned mask, bool syncwarp) {
  if (g_checks.racecheck && (syncwarp || g_checks.any_collective_orders)) race_warp_sync(warp_base, mask);
}

void on_warp_collective(unsigned mio) {
  if (g_checks.counters && mio) counters_collective(mio);
}

void on_mma() {
  if (g_checks.counters) counters_mma();
}

void on_fence() {
  if (g_exec.in_kernel && g_checks.racecheck) race_fence();
}

void on_host_memset(const void* dst, size_t bytes) {
  mark_written(dst, bytes);
  if (!g_exec.in_kernel && g_checks.counters) counters_memset(bytes);
}

void on_host_copy(const void* dst, size_t bytes) { mark_written(dst, bytes); }

void on_block_end() {
  if (g_checks.counters) counters_block_end();
}

void on_launch_end(bool ok) {
  if (g_checks.counters) counters_launch_end(ok);
  clear_launch_regions();
  g_exec.in_kernel = false;
  g_exec.checking = false;
  g_exec.desc = nullptr;
  g_exec.stack_lo = g_exec.stack_size = 0;
}

}  // namespace rt
}  // namespace simt

// ------------------------------------------------------------------ C API for Python (ctypes)
extern "C" {
// Each argument: 1 on, 0 off, -1 unchanged. Takes effect at the next launch.
void simt_set_checks(int memcheck, int racecheck, int counters, int any_collective_orders, int initcheck) {
  auto& c = simt::rt::g_checks;
  if (memcheck >= 0) c.memcheck = memcheck != 0;
  if (racecheck >= 0) c.racecheck = racecheck != 0;
  if (counters >= 0) c.counters = counters != 0;
  if (any_collective_orders >= 0) c.any_collective_orders = any_collective_orders != 0;
  if (initcheck >= 0) c.initcheck = initcheck != 0;
}
// Bit 0 memcheck, bit 1 racecheck, bit 2 counters, bit 3 any collective orders memory, bit 4 initcheck.
int simt_get_checks() {
  const auto& c = simt::rt::g_checks;
  return (c.memcheck ? 1 : 0) | (c.racecheck ? 2 : 0) | (c.counters ? 4 : 0) | (c.any_collective_orders ? 8 : 0) |
         (c.initcheck ? 16 : 0);
}
}
