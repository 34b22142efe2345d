// Portability layer: the same inline function compiles for the host (g++), the device (nvcc) and
// NVRTC (which has no host standard library: nothing here may include one under __CUDACC_RTC__).
//
// Floating-point contract of every backend: no contraction of a*b+c into an FMA behind our back
// (host: -ffp-contract=off; nvcc and NVRTC: --fmad=false, see setup.py and l2r_cuda/jit). Where the
// math wants an FMA it says so (fmadd), so every backend rounds the same operations the same way.
#pragma once

#if defined(__CUDACC_RTC__)
// The host's <cstdint> types, spelled as the host spells them (LP64: 64-bit long; Windows: long
// long), so that a kernel instantiated on int64_t has the same (mangled) name under NVRTC as under
// nvcc.
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
#if defined(_WIN32)
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
#else
typedef long int64_t;
typedef unsigned long uint64_t;
typedef unsigned long uintptr_t;
#endif
#else
#include <cstdint>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define L2R_HD __host__ __device__ __forceinline__
#define L2R_DEVICE_COMPILE 1
#else
#define L2R_HD inline __attribute__((always_inline))
#endif

#if defined(__CUDA_ARCH__)
#define L2R_ON_DEVICE 1
#endif

// The per-ISA namespace of everything inline that a translation unit compiled for one instruction
// set (route/cpu/route_cpu_avx2.cpp, ..._avx512.cpp define L2R_ISA before any include) shares with
// the others: lanes, fast math, the route math. Distinct mangled names per ISA, so the linker can
// never fold an AVX-512 copy of an inline function into code that runs on a CPU without it.
#ifndef L2R_ISA
#define L2R_ISA portable
#endif
#define L2R_ISA_BEGIN inline namespace L2R_ISA {
#define L2R_ISA_END }

// A bit cast through memory (the compilers turn it into a register move): NVRTC has a device
// memcpy but no __builtin_memcpy.
#if defined(__CUDACC_RTC__)
#define L2R_MEMCPY memcpy
#else
#define L2R_MEMCPY __builtin_memcpy
#endif

// Pins the offset of a field of a kernel parameter struct: the host compiler fills these structs and
// NVRTC-compiled kernels read their bytes, so every compiler must lay them out alike. g++ and nvcc
// (host and device passes) check the offsets; NVRTC has no constant offsetof, so there the struct
// sizes (static_assert(sizeof ...)) and the sizes of the field types below stand guard: with the
// same field sizes and alignments, the ABI's layout rules give the same offsets.
#if defined(__CUDACC_RTC__)
#define L2R_FIELD_AT(T, field, offset) static_assert(true, "")
#else
#define L2R_FIELD_AT(T, field, offset) static_assert(__builtin_offsetof(T, field) == (offset), #T "." #field)
#endif
static_assert(sizeof(void*) == 8 && sizeof(int64_t) == 8 && sizeof(int) == 4 && sizeof(float) == 4 &&
                  sizeof(bool) == 1 && alignof(int64_t) == 8,
              "kernel parameter structs assume a 64-bit data model (LP64 / LLP64)");
