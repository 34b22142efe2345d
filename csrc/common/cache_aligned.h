// std::vector storage that starts on a 64-byte boundary (a cache line; one AVX-512 vector). The
// default allocator only promises 16 bytes, and a row that starts 16, 32 or 48 bytes into a line
// makes every 64-byte vector load of it straddle two lines: the CPU route kernels load the prepared
// projection rows and transposed anchors a whole vector at a time in their inner loops, which ran
// about a quarter slower on such rows. Host-only.
#pragma once

#include <cstddef>
#include <new>
#include <vector>

namespace l2r {

constexpr std::size_t kCacheLine = 64;

template <typename T>
struct CacheAlignedAllocator {
  using value_type = T;
  CacheAlignedAllocator() = default;
  template <typename U>
  CacheAlignedAllocator(const CacheAlignedAllocator<U>&) noexcept {}
  T* allocate(std::size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(kCacheLine)));
  }
  void deallocate(T* p, std::size_t) noexcept { ::operator delete(p, std::align_val_t(kCacheLine)); }
  template <typename U>
  bool operator==(const CacheAlignedAllocator<U>&) const noexcept { return true; }
  template <typename U>
  bool operator!=(const CacheAlignedAllocator<U>&) const noexcept { return false; }
};

template <typename T>
using CacheAlignedVector = std::vector<T, CacheAlignedAllocator<T>>;

}  // namespace l2r
