// ThreadSanitizer's compiler ABI, implemented by the emulator instead of libtsan. Kernel sources
// built with sanitize=True (harness.build) are compiled with -fsanitize=thread, which makes g++
// call __tsan_readN / __tsan_writeN (N = 1, 2, 4, 8, 16) before every load and store that may touch
// memory, and __tsan_atomicN_* for atomic operations. The library is linked without libtsan, so the
// calls land here: each becomes simt::rt::on_access(address, size, flags, instruction), where the
// instruction is the return address into the instrumented code (one per static access site).
// Atomic operations are performed here (the runtime itself is not instrumented) and reported as
// atomic accesses, which racecheck exempts.
#include "simt_internal.h"

using simt::rt::kAtomic;
using simt::rt::kRead;
using simt::rt::kUnaligned;
using simt::rt::kWrite;
using simt::rt::on_access;

#define SIMT_PC __builtin_return_address(0)
#define SIMT_NOINLINE __attribute__((noinline))

extern "C" {

void __tsan_init() {}
void __tsan_func_entry(void*) {}
void __tsan_func_exit() {}
void __tsan_vptr_update(void**, void*) {}
void __tsan_vptr_read(void**) {}
void __tsan_ignore_thread_begin() {}
void __tsan_ignore_thread_end() {}

#define SIMT_TSAN_RW(N)                                                                            \
  SIMT_NOINLINE void __tsan_read##N(void* a) { on_access(a, N, kRead, SIMT_PC); }                  \
  SIMT_NOINLINE void __tsan_write##N(void* a) { on_access(a, N, kWrite, SIMT_PC); }                \
  SIMT_NOINLINE void __tsan_unaligned_read##N(void* a) { on_access(a, N, kRead | kUnaligned, SIMT_PC); } \
  SIMT_NOINLINE void __tsan_unaligned_write##N(void* a) { on_access(a, N, kWrite | kUnaligned, SIMT_PC); } \
  SIMT_NOINLINE void __tsan_volatile_read##N(void* a) { on_access(a, N, kRead, SIMT_PC); }         \
  SIMT_NOINLINE void __tsan_volatile_write##N(void* a) { on_access(a, N, kWrite, SIMT_PC); }       \
  SIMT_NOINLINE void __tsan_read##N##_pc(void* a, void* pc) { on_access(a, N, kRead, pc); }        \
  SIMT_NOINLINE void __tsan_write##N##_pc(void* a, void* pc) { on_access(a, N, kWrite, pc); }
SIMT_TSAN_RW(1)
SIMT_TSAN_RW(2)
SIMT_TSAN_RW(4)
SIMT_TSAN_RW(8)
SIMT_TSAN_RW(16)
#undef SIMT_TSAN_RW

// Aggregate copies of other sizes (no alignment fault: the copy is split on a GPU too).
SIMT_NOINLINE void __tsan_read_range(void* a, unsigned long n) {
  if (n) on_access(a, static_cast<unsigned>(n), kRead | kUnaligned, SIMT_PC);
}
SIMT_NOINLINE void __tsan_write_range(void* a, unsigned long n) {
  if (n) on_access(a, static_cast<unsigned>(n), kWrite | kUnaligned, SIMT_PC);
}

// ---- atomics: T __tsan_atomicN_op(volatile T* a, ..., int memory_order)
#define SIMT_MO __ATOMIC_SEQ_CST
#define SIMT_TSAN_ATOMIC(N, T)                                                                     \
  SIMT_NOINLINE T __tsan_atomic##N##_load(const volatile T* a, int) {                              \
    on_access((const void*)a, sizeof(T), kRead | kAtomic, SIMT_PC);                                \
    return __atomic_load_n(a, SIMT_MO);                                                            \
  }                                                                                                \
  SIMT_NOINLINE void __tsan_atomic##N##_store(volatile T* a, T v, int) {                           \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    __atomic_store_n(a, v, SIMT_MO);                                                               \
  }                                                                                                \
  SIMT_NOINLINE T __tsan_atomic##N##_exchange(volatile T* a, T v, int) {                           \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_exchange_n(a, v, SIMT_MO);                                                     \
  }                                                                                                \
  SIMT_NOINLINE T __tsan_atomic##N##_fetch_add(volatile T* a, T v, int) {                          \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_fetch_add(a, v, SIMT_MO);                                                      \
  }                                                                                                \
  SIMT_NOINLINE T __tsan_atomic##N##_fetch_sub(volatile T* a, T v, int) {                          \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_fetch_sub(a, v, SIMT_MO);                                                      \
  }                                                                                                \
  SIMT_NOINLINE T __tsan_atomic##N##_fetch_and(volatile T* a, T v, int) {                          \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_fetch_and(a, v, SIMT_MO);                                                      \
  }                                                                                                \
  SIMT_NOINLINE T __tsan_atomic##N##_fetch_or(volatile T* a, T v, int) {                           \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_fetch_or(a, v, SIMT_MO);                                                       \
  }                                                                                                \
  SIMT_NOINLINE T __tsan_atomic##N##_fetch_xor(volatile T* a, T v, int) {                          \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_fetch_xor(a, v, SIMT_MO);                                                      \
  }                                                                                                \
  SIMT_NOINLINE T __tsan_atomic##N##_fetch_nand(volatile T* a, T v, int) {                         \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_fetch_nand(a, v, SIMT_MO);                                                     \
  }                                                                                                \
  SIMT_NOINLINE int __tsan_atomic##N##_compare_exchange_strong(volatile T* a, T* c, T v, int, int) { \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_compare_exchange_n(a, c, v, false, SIMT_MO, SIMT_MO);                          \
  }                                                                                                \
  SIMT_NOINLINE int __tsan_atomic##N##_compare_exchange_weak(volatile T* a, T* c, T v, int, int) { \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    return __atomic_compare_exchange_n(a, c, v, false, SIMT_MO, SIMT_MO);                          \
  }                                                                                                \
  SIMT_NOINLINE T __tsan_atomic##N##_compare_exchange_val(volatile T* a, T c, T v, int, int) {     \
    on_access((const void*)a, sizeof(T), kWrite | kAtomic, SIMT_PC);                               \
    __atomic_compare_exchange_n(a, &c, v, false, SIMT_MO, SIMT_MO);                                \
    return c;                                                                                      \
  }
SIMT_TSAN_ATOMIC(8, char)
SIMT_TSAN_ATOMIC(16, short)
SIMT_TSAN_ATOMIC(32, int)
SIMT_TSAN_ATOMIC(64, long)
#undef SIMT_TSAN_ATOMIC

void __tsan_atomic_thread_fence(int) { __atomic_thread_fence(SIMT_MO); }
void __tsan_atomic_signal_fence(int) {}

}  // extern "C"
