// Portability layer: the same inline function compiles for the host (g++), the device (nvcc) and
// NVRTC (which has no host standard library: nothing here may include one under __CUDACC_RTC__).
//
// Floating-point contract of every backend: no contraction of a*b+c into an FMA behind our back
// (host: -ffp-contract=off; nvcc and NVRTC: --fmad=false, see setup.py and l2r_cuda/jit). Where the
// math wants an FMA it says so (fmadd), so every backend rounds the same operations the same way.
#pragma once

#if defined(__CUDACC_RTC__)
typedef signed char int8_t;
typedef short int16_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
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
