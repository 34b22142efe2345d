// initcheck: a load of global memory that nothing wrote since it was allocated, which
// compute-sanitizer --tool initcheck reports as "Uninitialized __global__ memory read of size N
// bytes". A GPU program gets memory with undefined content from cudaMalloc(Async) and from the
// caching allocator behind at::empty; a test stands in for the latter by registering a buffer as
// uninitialized (simt.ptr(t, uninitialized=True)). Every other registered buffer has content (a
// tensor the test filled). Kernel stores and atomics, cudaMemset and cudaMemcpy write bytes; a load
// touching any byte still unwritten fails the launch like memcheck does.
//
// Shadow: one byte per byte of each such allocation (InitShadow), owned by its registration so that
// it survives the rebuilds of the merged regions (every register / unregister), which only point at
// it. A byte once written stays written until the allocation goes away: unlike racecheck's cells,
// nothing here is per launch, so a scratch one launch fills may be read by the next.
#include "simt_internal.h"

#include <algorithm>
#include <string>

namespace simt {
namespace rt {
namespace {

[[noreturn]] void report(const Region& r, uintptr_t p, unsigned size, uintptr_t first, size_t unwritten,
                         const void* pc) {
  fail_kernel(cudaErrorLaunchFailure,
              fmt("SIMT initcheck: Uninitialized __global__ memory read of size %u bytes in kernel '%s' by ", size,
                  g_exec.desc ? g_exec.desc->name : "?") +
                  describe_thread() + ": " + describe_address(p, size) +
                  fmt("; %zu of the bytes read were never written since the allocation, the first at offset %llu",
                      unwritten, static_cast<unsigned long long>(first - r.lo)) +
                  " (" + describe_pc(pc) + ")\n  in " + where_now());
}

}  // namespace

void init_mark(InitShadow& s, uintptr_t lo, uintptr_t hi) {
  if (s.unwritten == 0) return;
  lo = std::max(lo, s.lo);
  hi = std::min(hi, s.hi);
  for (uintptr_t a = lo; a < hi; ++a) {
    uint8_t& w = s.written[a - s.lo];
    if (!w) {
      w = 1;
      --s.unwritten;
    }
  }
}

void init_access(Region& r, uintptr_t p, unsigned size, unsigned flags, const void* pc) {
  const uintptr_t end = std::min<uintptr_t>(p + size, r.hi);  // memcheck (when on) reported the rest
  if (flags & kWrite) {  // a store, or an atomic read-modify-write: its result defines the bytes
    for (InitShadow* s : r.init) init_mark(*s, p, end);
    return;
  }
  if (!g_checks.initcheck) return;
  for (const InitShadow* s : r.init) {
    if (s->unwritten == 0) continue;
    const uintptr_t lo = std::max(p, s->lo), hi = std::min(end, s->hi);
    uintptr_t first = 0;
    size_t unwritten = 0;
    for (uintptr_t a = lo; a < hi; ++a) {
      if (s->written[a - s->lo]) continue;
      if (unwritten++ == 0) first = a;
    }
    if (unwritten) report(r, p, size, first, unwritten, pc);
  }
}

}  // namespace rt
}  // namespace simt
