// Recycled storage for the CPU route ops' large outputs (route_cpu_buffers.h).
#include "route_cpu_buffers.h"

#include <atomic>
#include <cstdlib>
#include <mutex>
#include <string>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace l2r {
namespace route {
namespace cpu {
namespace {

constexpr size_t kHuge = size_t(2) << 20;        // block alignment and size granule
constexpr size_t kMinRecycled = size_t(4) << 20;  // smaller outputs: ATen's allocator
constexpr size_t kMaxFreeBlocks = 2;
constexpr size_t kMaxFreeBytes = size_t(1) << 30;

struct Block {
  void* data;
  size_t bytes;
};

struct Pool {
  std::mutex mutex;
  std::vector<Block> free;  // most recently freed last
  size_t free_bytes = 0;
  std::atomic<int64_t> reused{0}, fresh{0};

  static Pool& get() {
    static Pool* pool = new Pool();  // never destroyed: tensors may die during interpreter exit
    return *pool;
  }

  // A free block of at least `bytes` and at most twice that (not to pin a huge block for a small
  // request), the most recently freed first; else a new one.
  Block take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex);
      for (size_t i = free.size(); i-- > 0;) {
        if (free[i].bytes >= bytes && free[i].bytes <= 2 * bytes) {
          const Block b = free[i];
          free.erase(free.begin() + static_cast<std::ptrdiff_t>(i));
          free_bytes -= b.bytes;
          reused.fetch_add(1, std::memory_order_relaxed);
          return b;
        }
      }
    }
    fresh.fetch_add(1, std::memory_order_relaxed);
    void* data = std::aligned_alloc(kHuge, bytes);
    TORCH_CHECK(data != nullptr, "l2r_cuda: out of memory allocating ", bytes, " bytes for grad_x");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(data, bytes, MADV_HUGEPAGE);  // a hint: failures are ignored
#endif
    return {data, bytes};
  }

  void give_back(Block b) {
    std::vector<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex);
      free.push_back(b);
      free_bytes += b.bytes;
      while (free.size() > kMaxFreeBlocks || free_bytes > kMaxFreeBytes) {
        dropped.push_back(free.front());
        free_bytes -= free.front().bytes;
        free.erase(free.begin());
      }
    }
    for (const Block& d : dropped) std::free(d.data);
  }

  int64_t release() {
    std::vector<Block> dropped;
    {
      std::lock_guard<std::mutex> lock(mutex);
      dropped.swap(free);
      free_bytes = 0;
    }
    int64_t bytes = 0;
    for (const Block& d : dropped) {
      bytes += static_cast<int64_t>(d.bytes);
      std::free(d.data);
    }
    return bytes;
  }
};

// L2R_RECYCLE_BUFFERS=0: plain ATen allocations (to measure what recycling saves).
bool recycling_enabled() {
  static const bool enabled = [] {
    const char* v = std::getenv("L2R_RECYCLE_BUFFERS");
    return v == nullptr || std::string(v) != "0";
  }();
  return enabled;
}

}  // namespace

at::Tensor recycled_empty(at::IntArrayRef sizes, const at::TensorOptions& options) {
  int64_t numel = 1;
  for (const int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
  if (bytes < kMinRecycled || options.device().type() != c10::DeviceType::CPU || !recycling_enabled()) {
    return at::empty(sizes, options);
  }
  const size_t rounded = (bytes + kHuge - 1) / kHuge * kHuge;
  const Block b = Pool::get().take(rounded);
  return at::from_blob(
      b.data, sizes, [size = b.bytes](void* data) { Pool::get().give_back({data, size}); }, options);
}

int64_t release_recycled_buffers() { return Pool::get().release(); }

RecycledStats recycled_stats() {
  Pool& p = Pool::get();
  RecycledStats s;
  {
    std::lock_guard<std::mutex> lock(p.mutex);
    s.free_blocks = static_cast<int64_t>(p.free.size());
    s.free_bytes = static_cast<int64_t>(p.free_bytes);
  }
  s.reused = p.reused.load();
  s.fresh = p.fresh.load();
  return s;
}

}  // namespace cpu
}  // namespace route
}  // namespace l2r
