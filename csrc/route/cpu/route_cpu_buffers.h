// Storage for the CPU route ops' large outputs (route_backward's grad_x, as large as x) that is
// recycled between calls. A fresh allocation that size costs, on its first touch and on every call,
// a page fault per 4 KiB page (16384 for OLMoE's T = 8192, d = 2048 in float32), or, with
// transparent huge pages, a 2 MiB page clear per fault and, where the kernel compacts memory
// synchronously for madvised regions (defrag=madvise), occasional stalls of tens of milliseconds.
// A training step frees grad_x (once the layer below has consumed it) before the next router
// backward asks for one, so a freed block is handed out again with its pages already in place.
//
// Blocks are 2 MiB aligned with MADV_HUGEPAGE; at most 2 blocks (1 GiB in all) wait for reuse, the
// rest go back to the system. Small outputs use ATen's allocator, and so does everything with
// L2R_RECYCLE_BUFFERS=0.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace l2r {
namespace route {
namespace cpu {

// at::empty(sizes, options) for a CPU output, from a recycled block when it is large.
at::Tensor recycled_empty(at::IntArrayRef sizes, const at::TensorOptions& options);

// Frees every block waiting for reuse; returns how many bytes that released.
int64_t release_recycled_buffers();

// Blocks waiting for reuse, and how many requests a recycled block served / a new block served.
struct RecycledStats {
  int64_t free_blocks = 0, free_bytes = 0, reused = 0, fresh = 0;
};
RecycledStats recycled_stats();

}  // namespace cpu
}  // namespace route
}  // namespace l2r
