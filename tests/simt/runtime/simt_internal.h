// Interface between the emulator's scheduler (simt_core.cpp) and its memory checker
// (simt_memory.cpp, simt_race.cpp, simt_counters.cpp, simt_tsan.cpp). Not included by kernel code.
//
// Kernel translation units built with `sanitize=True` (harness.build) are compiled with
// -fsanitize=thread, but linked against simt_tsan.cpp instead of libtsan: every load and store of
// kernel code calls __tsan_readN / __tsan_writeN, which land in simt::rt::on_access below.
#pragma once

#include "simt/simt.h"

#include <cstdint>
#include <string>
#include <vector>

namespace simt {
namespace rt {

// What the checker needs to know about the running CUDA thread. The scheduler updates it at every
// fiber switch, so on_access reads plain fields instead of calling into the scheduler.
struct Exec {
  bool in_kernel = false;      // a kernel launch is running (false on the host side)
  bool checking = false;       // in_kernel and some check or counter is on
  uintptr_t stack_lo = 0;      // current fiber's stack: accesses there are local memory
  uintptr_t stack_size = 0;
  unsigned tid = 0;            // linear thread id in the block
  unsigned nthreads = 0;       // threads per block
  unsigned long long block = 0;  // linear block id (x + y * gx + z * gx * gy)
  unsigned long long launch = 0;  // launch number since the library was loaded
  const LaunchDesc* desc = nullptr;
};
extern Exec g_exec;

// Which checks run (runtime switches; only kernels built with sanitize=True report accesses).
struct Checks {
  bool memcheck = true;
  bool racecheck = true;
  bool counters = false;
  // initcheck: a load of global memory nothing wrote since its allocation (a cudaMalloc, a buffer
  // registered as uninitialized) is an error. Off stops the reports only: writes are tracked while
  // any check runs, so switching it back on does not report what was written meanwhile.
  bool initcheck = true;
  // Which warp collectives order memory between their lanes for racecheck: only __syncwarp (the
  // PTX memory model: bar.warp.sync orders memory, shfl/vote/redux do not), or every collective.
  bool any_collective_orders = false;
};
extern Checks g_checks;

enum AccessFlags : unsigned {
  kRead = 0,
  kWrite = 1u << 0,
  kAtomic = 1u << 1,     // atomic read-modify-write (exempt from racecheck)
  kUnaligned = 1u << 2,  // the compiler knows the access may be unaligned: no alignment fault
};

// initcheck's shadow of one allocation whose content starts undefined: one byte per byte, set once
// a kernel store or atomic, a cudaMemset or a cudaMemcpy wrote it. Owned by the registration (it
// outlives the merged regions, which are rebuilt whenever a buffer comes or goes).
struct InitShadow {
  InitShadow(uintptr_t lo_, uintptr_t hi_) : lo(lo_), hi(hi_), written(hi_ - lo_, 0), unwritten(hi_ - lo_) {}
  uintptr_t lo, hi;              // [lo, hi)
  std::vector<uint8_t> written;  // [hi - lo]
  size_t unwritten;              // bytes still 0 (none left: the check has nothing to find)
};

// Memory spaces an access can fall in.
enum Space : int { kGlobal = 0, kSharedDynamic = 1, kSharedStatic = 2, kParam = 3, kIgnored = 4 };

// One address range the running kernel may touch.
struct Region {
  uintptr_t lo = 0, hi = 0;  // [lo, hi)
  Space space = kGlobal;
  std::string name;
  unsigned long long id = 0;  // registration number (stable across launches)
  bool racecheck = true;      // false: a buffer the test exempts from racecheck (say why there)
  // initcheck: the shadows of the uninitialized registrations merged into this region (usually
  // none: a registered tensor has content; one for a cudaMalloc). Owned by the registrations: a
  // registration change marks the regions dirty, and they are rebuilt before the next access.
  std::vector<InitShadow*> init;
  // racecheck shadow (one cell per byte) and counter bitmaps (one bit per 32-byte sector);
  // allocated on first use, owned by the checker modules.
  void* race_shadow = nullptr;
  size_t race_cap = 0;  // bytes covered by race_shadow
  uint64_t* sector_touched = nullptr;
  uint64_t* sector_written = nullptr;
  unsigned long long sector_gen = 0;
};

// ---- instrumented code -> checker (simt_checker.cpp): one load or store of kernel code.
void on_access(const void* addr, unsigned size, unsigned flags, const void* pc);

// ---- scheduler -> checker (no-ops unless the launch checks anything)
void on_launch_begin(const LaunchDesc& d, unsigned nthreads, void* dyn_smem, size_t dyn_bytes);
void on_block_begin();
void on_barrier();                                  // a __syncthreads completed
// A warp collective completed for the lanes of mask; syncwarp: it was a __syncwarp.
void on_warp_sync(unsigned warp_base, unsigned mask, bool syncwarp);
void on_block_end();
void on_launch_end(bool ok);
// A warp collective completed that issues `mio` instructions through the MIO pipe (shuffles, redux).
void on_warp_collective(unsigned mio);
// A warp completed one mma.sync (tensor-core instruction).
void on_mma();
// __threadfence() by the running thread.
void on_fence();
// cudaMemset(Async) from host code: a launch of its own for the counters; the bytes are written.
void on_host_memset(const void* dst, size_t bytes);
// cudaMemcpy(2D)(Async) from host code wrote [dst, dst + bytes).
void on_host_copy(const void* dst, size_t bytes);

// printf into a std::string (messages; at most 1023 characters)
std::string fmt(const char* f, ...) __attribute__((format(printf, 1, 2)));

// ---- checker -> scheduler
// Aborts the running kernel like a device fault (sticky error `code`, message printed).
[[noreturn]] void fail_kernel(cudaError_t code, const std::string& msg);
// "kernel 'k' block (x,y,z) [grid ... block ...]"
std::string where_now();

// ---- registry (simt_memory.cpp)
// uninitialized: the content is undefined until written (cudaMalloc, an at::empty the test stands
// in for); initcheck reports loads of bytes not written since. Otherwise the buffer has content,
// and so do the bytes of uninitialized ones it overlaps.
unsigned long long register_region(const void* p, size_t n, Space space, const char* name,
                                   bool racecheck = true, bool uninitialized = false);
void unregister_region(const void* p);
void register_static_shared(const void* p, size_t n, const char* name);
// Per launch: the dynamic shared memory and the kernel's argument block.
void set_launch_regions(void* dyn, size_t dyn_bytes, const void* param, size_t param_bytes);
void clear_launch_regions();
// The region holding address p or, when there is none, nullptr.
Region* find_region(uintptr_t p);
// p lies in this library's own loaded segments (static data, literals): ignored by the checks.
bool in_module(uintptr_t p);
// [p, p + n) has content from now on (a cudaMemset or cudaMemcpy wrote it, or a buffer with content
// was registered over it): initcheck's shadows learn it.
void mark_written(const void* p, size_t n);
std::string describe_address(uintptr_t p, size_t n);  // nearest buffer, offsets
std::string describe_thread();                        // block, thread, warp, lane of the running thread
std::string describe_thread_id(unsigned tid);         // thread of the running block
std::string describe_pc(const void* pc);              // "pc lib.so+0x1234" (addr2line-able)
uintptr_t module_offset(const void* pc);              // pc relative to its library's load address
const void* pc_from_offset(const void* like, uintptr_t offset);  // inverse, in like's library

// ---- racecheck (simt_race.cpp)
void race_access(Region& r, uintptr_t p, unsigned size, unsigned flags, const void* pc);
void race_launch_begin();
void race_block_begin();
void race_barrier();
void race_warp_sync(unsigned warp_base, unsigned mask);
void race_region_freed(Region& r);
void race_fence();
void race_atomic(uintptr_t p, bool write);

// ---- initcheck (simt_init.cpp)
void init_mark(InitShadow& s, uintptr_t lo, uintptr_t hi);  // [lo, hi) (clipped to s) written
// A kernel access to a region with shadows: stores and atomics write, loads must find every byte
// written (reported when g_checks.initcheck).
void init_access(Region& r, uintptr_t p, unsigned size, unsigned flags, const void* pc);

// ---- counters (simt_counters.cpp)
void count_access(Region& r, uintptr_t p, unsigned size, unsigned flags, const void* pc);
void counters_launch_begin(const LaunchDesc& d, unsigned nthreads, size_t dyn_bytes);
void counters_block_end();
void counters_launch_end(bool ok);
void counters_region_freed(Region& r);
void counters_static_shared(uintptr_t p, size_t bytes);  // a static __shared__ variable of the launch
void counters_collective(unsigned mio);
void counters_mma();
void counters_memset(size_t bytes);

}  // namespace rt
}  // namespace simt
