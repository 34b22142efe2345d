// SIMT CPU emulation of the CUDA programming model (tests only).
//
// Every CUDA thread of a block is a user-space fiber on one OS thread; blocks
// run one after another.  This header is force-included (g++ -include) into
// every translation unit built by tests/simt/harness.py, so unchanged .cu
// sources compile with g++.  See tests/simt/README.md.
//
// Macros: __CUDACC__ and __CUDA_ARCH__ (900) are defined so that code takes its
// device path; L2R_SIMT and SIMT_EMULATION are defined so code can detect the
// emulator.  Define SIMT_NO_CUDA_ARCH before inclusion (harness: cuda_arch=None)
// to leave __CUDA_ARCH__ undefined.
#pragma once
#ifndef L2R_SIMT_H_
#define L2R_SIMT_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <source_location>
#include <tuple>
#include <type_traits>
#include <utility>

#ifndef __CUDACC__
#define __CUDACC__ 1
#endif
#if !defined(__CUDA_ARCH__) && !defined(SIMT_NO_CUDA_ARCH)
#define __CUDA_ARCH__ 900
#endif
#ifndef L2R_SIMT
#define L2R_SIMT 1
#endif
#define SIMT_EMULATION 1
#ifndef CUDART_VERSION
#define CUDART_VERSION 13000
#endif
#ifndef __CUDACC_VER_MAJOR__
#define __CUDACC_VER_MAJOR__ 13
#define __CUDACC_VER_MINOR__ 0
#define __CUDACC_VER_BUILD__ 0
#endif

// ---------------------------------------------------------------- qualifiers
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __shared__ static
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __align__(n) __attribute__((aligned(n)))
#define __builtin_align__(n) __attribute__((aligned(n)))
#define __cudart_builtin__
#define __device_builtin__
#define CUDARTAPI
// __restrict__ is understood natively by g++.

// ---------------------------------------------------------------- vector types
#define SIMT_VEC2(name, T, al) \
  struct __attribute__((aligned(al))) name { T x, y; }; \
  inline name make_##name(T x, T y) { name v; v.x = x; v.y = y; return v; }
#define SIMT_VEC3(name, T) \
  struct name { T x, y, z; }; \
  inline name make_##name(T x, T y, T z) { name v; v.x = x; v.y = y; v.z = z; return v; }
#define SIMT_VEC4(name, T, al) \
  struct __attribute__((aligned(al))) name { T x, y, z, w; }; \
  inline name make_##name(T x, T y, T z, T w) { name v; v.x = x; v.y = y; v.z = z; v.w = w; return v; }
#define SIMT_VEC1(name, T) \
  struct name { T x; }; \
  inline name make_##name(T x) { name v; v.x = x; return v; }

SIMT_VEC1(char1, signed char) SIMT_VEC2(char2, signed char, 2) SIMT_VEC3(char3, signed char) SIMT_VEC4(char4, signed char, 4)
SIMT_VEC1(uchar1, unsigned char) SIMT_VEC2(uchar2, unsigned char, 2) SIMT_VEC3(uchar3, unsigned char) SIMT_VEC4(uchar4, unsigned char, 4)
SIMT_VEC1(short1, short) SIMT_VEC2(short2, short, 4) SIMT_VEC3(short3, short) SIMT_VEC4(short4, short, 8)
SIMT_VEC1(ushort1, unsigned short) SIMT_VEC2(ushort2, unsigned short, 4) SIMT_VEC3(ushort3, unsigned short) SIMT_VEC4(ushort4, unsigned short, 8)
SIMT_VEC1(int1, int) SIMT_VEC2(int2, int, 8) SIMT_VEC3(int3, int) SIMT_VEC4(int4, int, 16)
SIMT_VEC1(uint1, unsigned int) SIMT_VEC2(uint2, unsigned int, 8) SIMT_VEC3(uint3, unsigned int) SIMT_VEC4(uint4, unsigned int, 16)
SIMT_VEC1(float1, float) SIMT_VEC2(float2, float, 8) SIMT_VEC3(float3, float) SIMT_VEC4(float4, float, 16)
SIMT_VEC1(longlong1, long long) SIMT_VEC2(longlong2, long long, 16)
SIMT_VEC1(ulonglong1, unsigned long long) SIMT_VEC2(ulonglong2, unsigned long long, 16)
SIMT_VEC1(double1, double) SIMT_VEC2(double2, double, 16)
#undef SIMT_VEC1
#undef SIMT_VEC2
#undef SIMT_VEC3
#undef SIMT_VEC4

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// ---------------------------------------------------------------- built-in variables
// Set by the scheduler before a fiber runs (see runtime/simt_core.cpp).
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

// ---------------------------------------------------------------- runtime API types
enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInitializationError = 3,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorInvalidDevicePointer = 17,
  cudaErrorInvalidMemcpyDirection = 21,
  cudaErrorInvalidDeviceFunction = 98,
  cudaErrorNoDevice = 100,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoKernelImageForDevice = 209,
  cudaErrorInvalidResourceHandle = 400,
  cudaErrorNotReady = 600,
  cudaErrorIllegalAddress = 700,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchTimeout = 702,
  cudaErrorMisalignedAddress = 716,
  cudaErrorAssert = 710,
  cudaErrorLaunchFailure = 719,
  cudaErrorNotSupported = 801,
  cudaErrorUnknown = 999,
};
typedef cudaError cudaError_t;
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
typedef cudaStream_t CUstream;
#define cudaStreamLegacy ((cudaStream_t)0x1)
#define cudaStreamPerThread ((cudaStream_t)0x2)
#define cudaStreamDefault 0x0
#define cudaStreamNonBlocking 0x1
#define cudaEventDefault 0x0
#define cudaEventDisableTiming 0x2
#define cudaHostAllocDefault 0x0

enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
  cudaFuncAttributePreferredSharedMemoryCarveout = 9,
  cudaFuncAttributeRequiredClusterWidth = 10,
  cudaFuncAttributeNonPortableClusterSizeAllowed = 16,
};
enum cudaFuncCache { cudaFuncCachePreferNone = 0, cudaFuncCachePreferShared = 1, cudaFuncCachePreferL1 = 2, cudaFuncCachePreferEqual = 3 };
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMaxBlockDimX = 2,
  cudaDevAttrMaxBlockDimY = 3,
  cudaDevAttrMaxBlockDimZ = 4,
  cudaDevAttrMaxGridDimX = 5,
  cudaDevAttrMaxGridDimY = 6,
  cudaDevAttrMaxGridDimZ = 7,
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrTotalConstantMemory = 9,
  cudaDevAttrWarpSize = 10,
  cudaDevAttrMaxRegistersPerBlock = 12,
  cudaDevAttrClockRate = 13,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerMultiprocessor = 81,
  cudaDevAttrMaxRegistersPerMultiprocessor = 82,
  cudaDevAttrMaxThreadsPerMultiProcessor = 39,
  cudaDevAttrL2CacheSize = 38,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
  cudaDevAttrMaxBlocksPerMultiprocessor = 106,
};
struct cudaDeviceProp {
  char name[256];
  size_t totalGlobalMem;
  size_t sharedMemPerBlock;
  int regsPerBlock;
  int warpSize;
  size_t memPitch;
  int maxThreadsPerBlock;
  int maxThreadsDim[3];
  int maxGridSize[3];
  int clockRate;
  size_t totalConstMem;
  int major;
  int minor;
  int multiProcessorCount;
  int l2CacheSize;
  int maxThreadsPerMultiProcessor;
  size_t sharedMemPerMultiprocessor;
  size_t sharedMemPerBlockOptin;
  int regsPerMultiprocessor;
  int maxBlocksPerMultiProcessor;
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int cacheModeCA;
  int maxDynamicSharedSizeBytes;
  int preferredShmemCarveout;
};

// ---------------------------------------------------------------- core runtime (simt_core.cpp)
namespace simt {
enum WarpKind : int {
  kSync = 0, kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kMatchAny,
  kRedAddU, kRedMinU, kRedMaxU, kRedMinI, kRedMaxI, kRedAnd, kRedOr, kRedXor, kActive, kMma,
};
// One lane's operands of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (the PTX ISA's
// fragment layout: g = lane / 4, c = lane % 4; a[0] row g, columns 2c, 2c + 1 (lower half the lower
// column), a[1] row g + 8, a[2] row g columns 2c + 8, 2c + 9, a[3] row g + 8 columns 2c + 8, 2c + 9;
// b[0] rows 2c, 2c + 1 of column g, b[1] rows 2c + 8, 2c + 9; c[i] and d[i] row g + 8 * (i / 2),
// column 2c + i % 2). The warp collective kMma passes each lane's address and writes d.
struct MmaBf16Operands {
  unsigned a[4];
  unsigned b[2];
  float c[4];
  float d[4];
};
struct LaunchDesc {
  const char* name;
  const void* fn;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  void (*invoke)(void*);
  void* data;
  size_t data_size;  // the argument block `data` points to (kernel parameter space)
};
cudaError_t launch(const LaunchDesc& d);
int syncthreads(int mode, int pred, const char* file, unsigned line);  // mode 0 plain,1 count,2 and,3 or
unsigned long long warp_op(int kind, unsigned mask, unsigned long long val, int param, int width,
                           const char* file, unsigned line, int bytes = 4);
unsigned activemask(const char* file, unsigned line);
void yield_now();
// __threadfence(): orders memory for racecheck's release/acquire between blocks (simt_race.cpp).
void threadfence();
// cudaMemset(Async): the bytes are set at once; the counters record it as a launch (a memset node).
void host_memset(void* dst, int value, size_t n);
// cudaMemcpy(2D)(Async): the bytes are copied at once; initcheck counts the destination written.
void host_copy(void* dst, const void* src, size_t n);
// cudaMalloc & co. (`api` names the buffer in checker messages). uninitialized: device memory, whose
// content stays undefined for initcheck until written; memory the host may write directly
// (cudaMallocHost, cudaHostAlloc, cudaMallocManaged) has content, as initcheck cannot see host stores.
cudaError_t alloc(void** p, size_t n, const char* api, bool uninitialized);
[[noreturn]] void trap(const char* what, const char* file, unsigned line);
unsigned char* dyn_smem_base();
// Inserted by rewrite.py after each function-scope __shared__ declaration: poisons the variable
// once per block and registers it with the memory checker under `name`.
void shared_poison(void* p, size_t n, unsigned long long* gen, const char* name);
long long clock_tick();
void record_error(cudaError_t e, const char* msg);
cudaError_t sticky_error();
cudaError_t get_last_error(bool reset);
void set_max_dyn_smem(const void* fn, int bytes);
int get_max_dyn_smem(const void* fn);
template <class T>
inline T* dyn_smem() { return reinterpret_cast<T*>(dyn_smem_base()); }
using SL = std::source_location;
}  // namespace simt

// ---------------------------------------------------------------- bit casts
template <class To, class From>
inline To simt_bitcast(const From& f) {
  static_assert(sizeof(To) == sizeof(From));
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

// ---------------------------------------------------------------- half / bfloat16
namespace simt {
inline unsigned short f32_to_bf16_bits(float f) {
  uint32_t u = simt_bitcast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;  // canonical NaN (as cvt.rn.bf16.f32)
  uint32_t bias = 0x7fffu + ((u >> 16) & 1u);
  return (unsigned short)((u + bias) >> 16);
}
inline unsigned short f32_to_bf16_bits_rz(float f) {
  uint32_t u = simt_bitcast<uint32_t>(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fff;
  return (unsigned short)(u >> 16);
}
inline float bf16_bits_to_f32(unsigned short h) { return simt_bitcast<float>((uint32_t)h << 16); }
inline unsigned short f32_to_f16_bits(float f) {
  uint32_t x = simt_bitcast<uint32_t>(f);
  uint16_t sign = (uint16_t)((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x > 0x7f800000u) return 0x7fff;               // NaN (canonical, as cvt.rn.f16.f32)
  if (x == 0x7f800000u) return sign | 0x7c00;        // inf
  int e = (int)(x >> 23) - 127;
  uint32_t mant = x & 0x7fffffu;
  if (e >= 16) return sign | 0x7c00;                 // overflow
  if (e >= -14) {                                    // normal half range
    uint32_t h = ((uint32_t)(e + 15) << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;  // may carry into inf: correct
    return (uint16_t)(sign | h);
  }
  if (e < -25) return sign;
  uint32_t m = mant | 0x800000u;
  int shift = -14 - e + 13;                          // 14..24
  uint32_t h = m >> shift;
  uint32_t rem = m & ((1u << shift) - 1u);
  uint32_t half = 1u << (shift - 1);
  if (rem > half || (rem == half && (h & 1u))) h++;
  return (uint16_t)(sign | h);
}
inline float f16_bits_to_f32(unsigned short h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
  uint32_t u;
  if (e == 0) {
    if (m == 0) u = sign;
    else {  // subnormal: normalise
      int sh = 0;
      while (!(m & 0x400u)) { m <<= 1; sh++; }
      m &= 0x3ffu;
      u = sign | ((uint32_t)(127 - 15 + 1 - sh) << 23) | (m << 13);
    }
  } else if (e == 31) {
    u = sign | 0x7f800000u | (m << 13);
  } else {
    u = sign | ((e + 127 - 15) << 23) | (m << 13);
  }
  return simt_bitcast<float>(u);
}
// double -> float with round-to-odd, so a following RNE to 16 bits rounds once.
inline float f64_to_f32_odd(double d) {
  if (std::isnan(d) || std::isinf(d)) return (float)d;
  float f = (float)d;
  if ((double)f == d) return f;
  if (std::fabs((double)f) > std::fabs(d)) f = std::nextafter(f, 0.0f);
  uint32_t u = simt_bitcast<uint32_t>(f);
  u |= 1u;
  return simt_bitcast<float>(u);
}
}  // namespace simt

struct __half_raw { unsigned short x; };
struct __nv_bfloat16_raw { unsigned short x; };

#define SIMT_DEFINE_16BIT(NAME, RAW, TOF, FROMF)                                              \
  struct __attribute__((aligned(2))) NAME {                                                   \
    unsigned short __x;                                                                       \
    NAME() = default;                                                                         \
    constexpr NAME(const RAW& r) : __x(r.x) {}                                                \
    NAME(float f) : __x(::simt::FROMF(f)) {}                                                  \
    NAME(double d) : __x(::simt::FROMF(::simt::f64_to_f32_odd(d))) {}                         \
    NAME(int v) : __x(::simt::FROMF(::simt::f64_to_f32_odd((double)v))) {}                    \
    NAME(unsigned int v) : __x(::simt::FROMF(::simt::f64_to_f32_odd((double)v))) {}           \
    NAME(long long v) : __x(::simt::FROMF(::simt::f64_to_f32_odd((double)v))) {}              \
    NAME(unsigned long long v) : __x(::simt::FROMF(::simt::f64_to_f32_odd((double)v))) {}     \
    NAME(long v) : __x(::simt::FROMF(::simt::f64_to_f32_odd((double)v))) {}                   \
    NAME(unsigned long v) : __x(::simt::FROMF(::simt::f64_to_f32_odd((double)v))) {}          \
    NAME(short v) : __x(::simt::FROMF((float)v)) {}                                           \
    NAME(unsigned short v) : __x(::simt::FROMF((float)v)) {}                                  \
    operator float() const { return ::simt::TOF(__x); }                                       \
    explicit operator double() const { return (double)::simt::TOF(__x); }                     \
    explicit operator int() const { return (int)::simt::TOF(__x); }                           \
    explicit operator bool() const { return (__x & 0x7fff) != 0; }                            \
    operator RAW() const { RAW r; r.x = __x; return r; }                                      \
    NAME& operator=(const RAW& r) { __x = r.x; return *this; }                                \
    NAME& operator=(float f) { __x = ::simt::FROMF(f); return *this; }                        \
    NAME& operator=(double d) { __x = ::simt::FROMF(::simt::f64_to_f32_odd(d)); return *this; } \
    NAME& operator+=(const NAME& o) { return *this = NAME((float)*this + (float)o); }         \
    NAME& operator-=(const NAME& o) { return *this = NAME((float)*this - (float)o); }         \
    NAME& operator*=(const NAME& o) { return *this = NAME((float)*this * (float)o); }         \
    NAME& operator/=(const NAME& o) { return *this = NAME((float)*this / (float)o); }         \
  };                                                                                          \
  inline NAME operator+(const NAME& a, const NAME& b) { return NAME((float)a + (float)b); }   \
  inline NAME operator-(const NAME& a, const NAME& b) { return NAME((float)a - (float)b); }   \
  inline NAME operator*(const NAME& a, const NAME& b) { return NAME((float)a * (float)b); }   \
  inline NAME operator/(const NAME& a, const NAME& b) { return NAME((float)a / (float)b); }   \
  inline NAME operator-(const NAME& a) { NAME r = a; r.__x ^= 0x8000; return r; }            \
  inline NAME operator+(const NAME& a) { return a; }                                          \
  inline bool operator==(const NAME& a, const NAME& b) { return (float)a == (float)b; }       \
  inline bool operator!=(const NAME& a, const NAME& b) { return (float)a != (float)b; }       \
  inline bool operator<(const NAME& a, const NAME& b) { return (float)a < (float)b; }         \
  inline bool operator<=(const NAME& a, const NAME& b) { return (float)a <= (float)b; }       \
  inline bool operator>(const NAME& a, const NAME& b) { return (float)a > (float)b; }         \
  inline bool operator>=(const NAME& a, const NAME& b) { return (float)a >= (float)b; }

SIMT_DEFINE_16BIT(__half, __half_raw, f16_bits_to_f32, f32_to_f16_bits)
SIMT_DEFINE_16BIT(__nv_bfloat16, __nv_bfloat16_raw, bf16_bits_to_f32, f32_to_bf16_bits)
#undef SIMT_DEFINE_16BIT
typedef __half half;
typedef __nv_bfloat16 nv_bfloat16;

struct __attribute__((aligned(4))) __half2 {
  __half x, y;
};
struct __attribute__((aligned(4))) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
typedef __half2 half2;
typedef __nv_bfloat162 nv_bfloat162;
static_assert(sizeof(__half) == 2 && sizeof(__half2) == 4 && sizeof(__nv_bfloat162) == 4);
static_assert(std::is_trivially_copyable_v<__half> && std::is_trivially_copyable_v<__nv_bfloat16>);

// conversions
inline __half __float2half(float f) { __half_raw r{::simt::f32_to_f16_bits(f)}; return __half(r); }
inline __half __float2half_rn(float f) { return __float2half(f); }
inline __half __double2half(double d) { return __float2half(::simt::f64_to_f32_odd(d)); }
inline float __half2float(__half h) { return ::simt::f16_bits_to_f32(h.__x); }
inline unsigned short __half_as_ushort(__half h) { return h.__x; }
inline short __half_as_short(__half h) { return (short)h.__x; }
inline __half __ushort_as_half(unsigned short u) { return __half(__half_raw{u}); }
inline __half __short_as_half(short s) { return __half(__half_raw{(unsigned short)s}); }
inline __half __int2half_rn(int i) { return __half(i); }
inline int __half2int_rn(__half h) { return (int)std::nearbyint(__half2float(h)); }
inline int __half2int_rz(__half h) { return (int)__half2float(h); }
inline __nv_bfloat16 __float2bfloat16(float f) { __nv_bfloat16_raw r{::simt::f32_to_bf16_bits(f)}; return __nv_bfloat16(r); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __float2bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rz(float f) { __nv_bfloat16_raw r{::simt::f32_to_bf16_bits_rz(f)}; return __nv_bfloat16(r); }
inline __nv_bfloat16 __double2bfloat16(double d) { return __float2bfloat16(::simt::f64_to_f32_odd(d)); }
inline float __bfloat162float(__nv_bfloat16 h) { return ::simt::bf16_bits_to_f32(h.__x); }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.__x; }
inline short __bfloat16_as_short(__nv_bfloat16 h) { return (short)h.__x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return __nv_bfloat16(__nv_bfloat16_raw{u}); }
inline __nv_bfloat16 __short_as_bfloat16(short s) { return __nv_bfloat16(__nv_bfloat16_raw{(unsigned short)s}); }
inline __nv_bfloat16 __int2bfloat16_rn(int i) { return __nv_bfloat16(i); }
inline int __bfloat162int_rn(__nv_bfloat16 h) { return (int)std::nearbyint(__bfloat162float(h)); }
inline int __bfloat162int_rz(__nv_bfloat16 h) { return (int)__bfloat162float(h); }

inline __half2 __halves2half2(__half a, __half b) { return __half2{a, b}; }
inline __half2 __half2half2(__half a) { return __half2{a, a}; }
inline __half2 __floats2half2_rn(float a, float b) { return __half2{__float2half(a), __float2half(b)}; }
inline __half2 __float2half2_rn(float a) { return __floats2half2_rn(a, a); }
inline __half2 __float22half2_rn(float2 f) { return __floats2half2_rn(f.x, f.y); }
inline float2 __half22float2(__half2 h) { return make_float2(__half2float(h.x), __half2float(h.y)); }
inline __half __low2half(__half2 h) { return h.x; }
inline __half __high2half(__half2 h) { return h.y; }
inline float __low2float(__half2 h) { return __half2float(h.x); }
inline float __high2float(__half2 h) { return __half2float(h.y); }
inline __nv_bfloat162 __halves2bfloat162(__nv_bfloat16 a, __nv_bfloat16 b) { return __nv_bfloat162{a, b}; }
inline __nv_bfloat162 __bfloat162bfloat162(__nv_bfloat16 a) { return __nv_bfloat162{a, a}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return __nv_bfloat162{__float2bfloat16(a), __float2bfloat16(b)}; }
inline __nv_bfloat162 __float2bfloat162_rn(float a) { return __floats2bfloat162_rn(a, a); }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return __floats2bfloat162_rn(f.x, f.y); }
inline float2 __bfloat1622float2(__nv_bfloat162 h) { return make_float2(__bfloat162float(h.x), __bfloat162float(h.y)); }
inline __nv_bfloat16 __low2bfloat16(__nv_bfloat162 h) { return h.x; }
inline __nv_bfloat16 __high2bfloat16(__nv_bfloat162 h) { return h.y; }
inline float __low2float(__nv_bfloat162 h) { return __bfloat162float(h.x); }
inline float __high2float(__nv_bfloat162 h) { return __bfloat162float(h.y); }

#define SIMT_16BIT_MATH(T, T2)                                                                              \
  inline T __hadd(T a, T b) { return T((float)a + (float)b); }                                              \
  inline T __hsub(T a, T b) { return T((float)a - (float)b); }                                              \
  inline T __hmul(T a, T b) { return T((float)a * (float)b); }                                              \
  inline T __hdiv(T a, T b) { return T((float)a / (float)b); }                                              \
  inline T __hfma(T a, T b, T c) { return T((double)(float)a * (double)(float)b + (double)(float)c); }      \
  inline T __hneg(T a) { return -a; }                                                                       \
  inline T __habs(T a) { T r = a; r.__x &= 0x7fff; return r; }                                              \
  inline T __hmax(T a, T b) { return (float)a >= (float)b || std::isnan((float)b) ? a : b; }                \
  inline T __hmin(T a, T b) { return (float)a <= (float)b || std::isnan((float)b) ? a : b; }                \
  inline bool __heq(T a, T b) { return (float)a == (float)b; }                                              \
  inline bool __hne(T a, T b) { return (float)a != (float)b && !std::isnan((float)a) && !std::isnan((float)b); } \
  inline bool __hlt(T a, T b) { return (float)a < (float)b; }                                               \
  inline bool __hle(T a, T b) { return (float)a <= (float)b; }                                              \
  inline bool __hgt(T a, T b) { return (float)a > (float)b; }                                               \
  inline bool __hge(T a, T b) { return (float)a >= (float)b; }                                              \
  inline bool __hisnan(T a) { return std::isnan((float)a); }                                                \
  inline int __hisinf(T a) { float f = (float)a; return std::isinf(f) ? (f > 0 ? 1 : -1) : 0; }            \
  inline T2 __hadd2(T2 a, T2 b) { return T2{__hadd(a.x, b.x), __hadd(a.y, b.y)}; }                          \
  inline T2 __hsub2(T2 a, T2 b) { return T2{__hsub(a.x, b.x), __hsub(a.y, b.y)}; }                          \
  inline T2 __hmul2(T2 a, T2 b) { return T2{__hmul(a.x, b.x), __hmul(a.y, b.y)}; }                          \
  inline T2 __hfma2(T2 a, T2 b, T2 c) { return T2{__hfma(a.x, b.x, c.x), __hfma(a.y, b.y, c.y)}; }          \
  inline T2 __hmax2(T2 a, T2 b) { return T2{__hmax(a.x, b.x), __hmax(a.y, b.y)}; }                          \
  inline T2 __hmin2(T2 a, T2 b) { return T2{__hmin(a.x, b.x), __hmin(a.y, b.y)}; }                          \
  inline T2 __lowhigh2highlow(T2 a) { return T2{a.y, a.x}; }                                                \
  inline T hsqrt(T a) { return T(std::sqrt((float)a)); }                                                    \
  inline T hexp(T a) { return T(std::exp((float)a)); }                                                      \
  inline T hlog(T a) { return T(std::log((float)a)); }                                                      \
  inline T hrsqrt(T a) { return T(1.0f / std::sqrt((float)a)); }
SIMT_16BIT_MATH(__half, __half2)
SIMT_16BIT_MATH(__nv_bfloat16, __nv_bfloat162)
#undef SIMT_16BIT_MATH

// ---------------------------------------------------------------- math constants
#ifndef CUDART_INF_F
#define CUDART_INF_F (std::numeric_limits<float>::infinity())
#define CUDART_NAN_F (std::numeric_limits<float>::quiet_NaN())
#define CUDART_INF (std::numeric_limits<double>::infinity())
#define CUDART_NAN (std::numeric_limits<double>::quiet_NaN())
#define CUDART_MAX_NORMAL_F 3.402823466e+38f
#define CUDART_MIN_DENORM_F 1.40129846e-45f
#define CUDART_PI_F 3.141592654f
#define CUDART_PI 3.1415926535897931e+0
#define CUDART_LN2_F 0.693147181f
#define CUDART_L2E_F 1.442695041f
#define CUDART_SQRT_HALF_F 0.707106781f
#endif

// ---------------------------------------------------------------- float intrinsics
// NOTE: fast-math intrinsics (__expf, __logf, rsqrtf, ...) are computed with
// accurate libm functions; results may differ from the GPU in the last ulps.
inline float __expf(float x) { return std::exp(x); }
inline float __exp10f(float x) { return std::pow(10.0f, x); }
inline float __logf(float x) { return std::log(x); }
inline float __log2f(float x) { return std::log2(x); }
inline float __log10f(float x) { return std::log10(x); }
inline float __powf(float x, float y) { return std::pow(x, y); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float __tanf(float x) { return std::tan(x); }
inline void __sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
inline float __tanhf(float x) { return std::tanh(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fsqrt_rn(float x) { return std::sqrt(x); }
inline float __frsqrt_rn(float x) { return 1.0f / std::sqrt(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline float __saturatef(float x) { return std::isnan(x) ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __int_as_float(int i) { return simt_bitcast<float>(i); }
inline int __float_as_int(float f) { return simt_bitcast<int>(f); }
inline unsigned int __float_as_uint(float f) { return simt_bitcast<unsigned int>(f); }
inline float __uint_as_float(unsigned int u) { return simt_bitcast<float>(u); }
inline long long __double_as_longlong(double d) { return simt_bitcast<long long>(d); }
inline double __longlong_as_double(long long l) { return simt_bitcast<double>(l); }
inline int __float2int_rn(float f) { return (int)std::nearbyint(f); }
inline int __float2int_rz(float f) { return (int)f; }
inline int __float2int_rd(float f) { return (int)std::floor(f); }
inline int __float2int_ru(float f) { return (int)std::ceil(f); }
inline unsigned __float2uint_rn(float f) { return (unsigned)std::nearbyint(f); }
inline unsigned __float2uint_rz(float f) { return (unsigned)f; }
inline long long __float2ll_rn(float f) { return (long long)std::nearbyint(f); }
inline float __int2float_rn(int i) { return (float)i; }
inline float __uint2float_rn(unsigned u) { return (float)u; }
inline float __ll2float_rn(long long i) { return (float)i; }
inline float __double2float_rn(double d) { return (float)d; }
inline float exp10f(float x) { return std::pow(10.0f, x); }
inline float normcdff(float x) { return 0.5f * std::erfc(-x * 0.70710678118654752f); }

// integer intrinsics
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll((unsigned long long)x); }
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  x = ((x >> 1) & 0x55555555u) | ((x & 0x55555555u) << 1);
  x = ((x >> 2) & 0x33333333u) | ((x & 0x33333333u) << 2);
  x = ((x >> 4) & 0x0f0f0f0fu) | ((x & 0x0f0f0f0fu) << 4);
  return __builtin_bswap32(x);
}
inline unsigned long long __brevll(unsigned long long x) {
  return ((unsigned long long)__brev((unsigned)x) << 32) | __brev((unsigned)(x >> 32));
}
inline unsigned int __umulhi(unsigned int a, unsigned int b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline int __mulhi(int a, int b) { return (int)(((long long)a * b) >> 32); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) { return (unsigned long long)(((unsigned __int128)a * b) >> 64); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * b) >> 64); }
inline int __mul24(int a, int b) { return (int)((long long)(a << 8 >> 8) * (b << 8 >> 8)); }
inline unsigned __umul24(unsigned a, unsigned b) { return (a & 0xffffffu) * (b & 0xffffffu); }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  unsigned long long v = ((unsigned long long)hi << 32) | lo; return (unsigned)((v << (s & 31)) >> 32); }
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  unsigned long long v = ((unsigned long long)hi << 32) | lo; return (unsigned)(v >> (s & 31)); }
inline unsigned __byte_perm(unsigned x, unsigned y, unsigned s) {
  unsigned long long v = ((unsigned long long)y << 32) | x; unsigned r = 0;
  for (int i = 0; i < 4; ++i) { unsigned sel = (s >> (4 * i)) & 7u; r |= (unsigned)((v >> (8 * sel)) & 0xffu) << (8 * i); }
  return r;
}
inline int __sad(int a, int b, unsigned c) { return (a > b ? a - b : b - a) + (int)c; }
inline int __hadd(int a, int b) { return (int)(((long long)a + b) >> 1); }
inline int __rhadd(int a, int b) { return (int)(((long long)a + b + 1) >> 1); }

// min / max overloads as provided by the CUDA math headers
#define SIMT_MINMAX(A, B, R)                                  \
  inline R min(A a, B b) { return (R)a < (R)b ? (R)a : (R)b; } \
  inline R max(A a, B b) { return (R)a > (R)b ? (R)a : (R)b; }
SIMT_MINMAX(int, int, int)
SIMT_MINMAX(unsigned int, unsigned int, unsigned int)
SIMT_MINMAX(int, unsigned int, unsigned int)
SIMT_MINMAX(unsigned int, int, unsigned int)
SIMT_MINMAX(long, long, long)
SIMT_MINMAX(unsigned long, unsigned long, unsigned long)
SIMT_MINMAX(long long, long long, long long)
SIMT_MINMAX(unsigned long long, unsigned long long, unsigned long long)
SIMT_MINMAX(long long, unsigned long long, unsigned long long)
SIMT_MINMAX(unsigned long long, long long, unsigned long long)
#undef SIMT_MINMAX
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
inline double min(double a, double b) { return std::fmin(a, b); }
inline double max(double a, double b) { return std::fmax(a, b); }
inline double min(float a, double b) { return std::fmin((double)a, b); }
inline double max(float a, double b) { return std::fmax((double)a, b); }
inline double min(double a, float b) { return std::fmin(a, (double)b); }
inline double max(double a, float b) { return std::fmax(a, (double)b); }
inline unsigned int umin(unsigned int a, unsigned int b) { return a < b ? a : b; }
inline unsigned int umax(unsigned int a, unsigned int b) { return a > b ? a : b; }
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a > b ? a : b; }
inline unsigned long long ullmin(unsigned long long a, unsigned long long b) { return a < b ? a : b; }
inline unsigned long long ullmax(unsigned long long a, unsigned long long b) { return a > b ? a : b; }

// ---------------------------------------------------------------- loads / stores / fences
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }
inline void __threadfence() { ::simt::threadfence(); }
inline void __threadfence_block() {}
inline void __threadfence_system() {}
template <class T> inline void __prefetch_global_l2(const T*) {}
inline long long clock64() { return ::simt::clock_tick(); }
inline unsigned long long __globaltimer() { return (unsigned long long)::simt::clock_tick(); }
inline void __nanosleep(unsigned) { ::simt::yield_now(); }
[[noreturn]] inline void __trap(::simt::SL loc = ::simt::SL::current()) { ::simt::trap("__trap()", loc.file_name(), loc.line()); }
[[noreturn]] inline void __brkpt(::simt::SL loc = ::simt::SL::current()) { ::simt::trap("__brkpt()", loc.file_name(), loc.line()); }

// ---------------------------------------------------------------- block barrier
inline void __syncthreads(::simt::SL loc = ::simt::SL::current()) { ::simt::syncthreads(0, 0, loc.file_name(), loc.line()); }
inline int __syncthreads_count(int p, ::simt::SL loc = ::simt::SL::current()) { return ::simt::syncthreads(1, p, loc.file_name(), loc.line()); }
inline int __syncthreads_and(int p, ::simt::SL loc = ::simt::SL::current()) { return ::simt::syncthreads(2, p, loc.file_name(), loc.line()); }
inline int __syncthreads_or(int p, ::simt::SL loc = ::simt::SL::current()) { return ::simt::syncthreads(3, p, loc.file_name(), loc.line()); }

// ---------------------------------------------------------------- warp collectives
namespace simt {
template <class T>
inline T warp_shfl(int kind, unsigned mask, T var, int param, int width, const SL& loc) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "shuffle of a type wider than 8 bytes");
  unsigned long long u = 0;
  std::memcpy(&u, &var, sizeof(T));
  u = warp_op(kind, mask, u, param, width, loc.file_name(), loc.line(), static_cast<int>(sizeof(T)));
  T r;
  std::memcpy(&r, &u, sizeof(T));
  return r;
}
}  // namespace simt
inline void __syncwarp(unsigned mask = 0xffffffffu, ::simt::SL loc = ::simt::SL::current()) {
  ::simt::warp_op(::simt::kSync, mask, 0, 0, 32, loc.file_name(), loc.line());
}
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, ::simt::SL loc = ::simt::SL::current()) {
  return ::simt::warp_shfl(::simt::kShflIdx, mask, var, srcLane, width, loc);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, ::simt::SL loc = ::simt::SL::current()) {
  return ::simt::warp_shfl(::simt::kShflUp, mask, var, (int)delta, width, loc);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, ::simt::SL loc = ::simt::SL::current()) {
  return ::simt::warp_shfl(::simt::kShflDown, mask, var, (int)delta, width, loc);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, ::simt::SL loc = ::simt::SL::current()) {
  return ::simt::warp_shfl(::simt::kShflXor, mask, var, laneMask, width, loc);
}
// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {d}, {a}, {b}, {c}: a warp-wide collective of
// all 32 lanes (".aligned": every lane of the warp executes the same instruction, converged). The
// products are exact (8-bit significands) and are added with c in double precision, rounded once
// to float; the hardware's internal summation order and rounding are unspecified, so kernels must
// not depend on bitwise equality with any other summation.
inline void __simt_mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2], const float (&c)[4],
                                     ::simt::SL loc = ::simt::SL::current()) {
  ::simt::MmaBf16Operands op;
  for (int i = 0; i < 4; ++i) op.a[i] = a[i], op.c[i] = c[i];
  for (int i = 0; i < 2; ++i) op.b[i] = b[i];
  ::simt::warp_op(::simt::kMma, 0xffffffffu, reinterpret_cast<unsigned long long>(&op), 0, 32, loc.file_name(),
                  loc.line());
  for (int i = 0; i < 4; ++i) d[i] = op.d[i];
}
inline unsigned __ballot_sync(unsigned mask, int pred, ::simt::SL loc = ::simt::SL::current()) {
  return (unsigned)::simt::warp_op(::simt::kBallot, mask, pred != 0, 0, 32, loc.file_name(), loc.line());
}
inline int __any_sync(unsigned mask, int pred, ::simt::SL loc = ::simt::SL::current()) {
  return (int)::simt::warp_op(::simt::kAny, mask, pred != 0, 0, 32, loc.file_name(), loc.line());
}
inline int __all_sync(unsigned mask, int pred, ::simt::SL loc = ::simt::SL::current()) {
  return (int)::simt::warp_op(::simt::kAll, mask, pred != 0, 0, 32, loc.file_name(), loc.line());
}
inline int __uni_sync(unsigned mask, int pred, ::simt::SL loc = ::simt::SL::current()) {
  unsigned b = (unsigned)::simt::warp_op(::simt::kBallot, mask, pred != 0, 0, 32, loc.file_name(), loc.line());
  return b == 0 || b == mask;
}
template <class T>
inline unsigned __match_any_sync(unsigned mask, T value, ::simt::SL loc = ::simt::SL::current()) {
  static_assert(sizeof(T) <= 8);
  unsigned long long u = 0;
  std::memcpy(&u, &value, sizeof(T));
  return (unsigned)::simt::warp_op(::simt::kMatchAny, mask, u, 0, 32, loc.file_name(), loc.line(),
                                   static_cast<int>(sizeof(T)));
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v, ::simt::SL loc = ::simt::SL::current()) {
  return (unsigned)::simt::warp_op(::simt::kRedAddU, mask, v, 0, 32, loc.file_name(), loc.line()); }
inline int __reduce_add_sync(unsigned mask, int v, ::simt::SL loc = ::simt::SL::current()) {
  return (int)::simt::warp_op(::simt::kRedAddU, mask, (unsigned)v, 0, 32, loc.file_name(), loc.line()); }
inline unsigned __reduce_min_sync(unsigned mask, unsigned v, ::simt::SL loc = ::simt::SL::current()) {
  return (unsigned)::simt::warp_op(::simt::kRedMinU, mask, v, 0, 32, loc.file_name(), loc.line()); }
inline unsigned __reduce_max_sync(unsigned mask, unsigned v, ::simt::SL loc = ::simt::SL::current()) {
  return (unsigned)::simt::warp_op(::simt::kRedMaxU, mask, v, 0, 32, loc.file_name(), loc.line()); }
inline int __reduce_min_sync(unsigned mask, int v, ::simt::SL loc = ::simt::SL::current()) {
  return (int)::simt::warp_op(::simt::kRedMinI, mask, (unsigned)v, 0, 32, loc.file_name(), loc.line()); }
inline int __reduce_max_sync(unsigned mask, int v, ::simt::SL loc = ::simt::SL::current()) {
  return (int)::simt::warp_op(::simt::kRedMaxI, mask, (unsigned)v, 0, 32, loc.file_name(), loc.line()); }
inline unsigned __reduce_and_sync(unsigned mask, unsigned v, ::simt::SL loc = ::simt::SL::current()) {
  return (unsigned)::simt::warp_op(::simt::kRedAnd, mask, v, 0, 32, loc.file_name(), loc.line()); }
inline unsigned __reduce_or_sync(unsigned mask, unsigned v, ::simt::SL loc = ::simt::SL::current()) {
  return (unsigned)::simt::warp_op(::simt::kRedOr, mask, v, 0, 32, loc.file_name(), loc.line()); }
inline unsigned __reduce_xor_sync(unsigned mask, unsigned v, ::simt::SL loc = ::simt::SL::current()) {
  return (unsigned)::simt::warp_op(::simt::kRedXor, mask, v, 0, 32, loc.file_name(), loc.line()); }
// Lanes of the current warp that reach this __activemask() together: the call
// waits until every other live lane of the block is blocked or exited, then
// returns the lanes of this warp waiting at the same call site.
inline unsigned __activemask(::simt::SL loc = ::simt::SL::current()) { return ::simt::activemask(loc.file_name(), loc.line()); }
inline unsigned __lanemask_lt() { unsigned l = ((blockDim.x * (blockDim.y * threadIdx.z + threadIdx.y)) + threadIdx.x) & 31u; return (1u << l) - 1u; }

// ---------------------------------------------------------------- atomics
// All fibers run on one OS thread, but std::atomic_ref keeps host-side use safe.
namespace simt {
template <class T>
inline T atomic_rmw_add(T* p, T v) { return std::atomic_ref<T>(*p).fetch_add(v, std::memory_order_relaxed); }
template <class T, class F>
inline T atomic_rmw(T* p, F f) {
  std::atomic_ref<T> r(*p);
  T old = r.load(std::memory_order_relaxed);
  while (!r.compare_exchange_weak(old, f(old), std::memory_order_relaxed)) {}
  return old;
}
}  // namespace simt
inline int atomicAdd(int* p, int v) { return ::simt::atomic_rmw_add(p, v); }
inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return ::simt::atomic_rmw_add(p, v); }
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { return ::simt::atomic_rmw_add(p, v); }
inline long long atomicAdd(long long* p, long long v) { return ::simt::atomic_rmw_add(p, v); }
inline float atomicAdd(float* p, float v) { return ::simt::atomic_rmw_add(p, v); }
inline double atomicAdd(double* p, double v) { return ::simt::atomic_rmw_add(p, v); }
// 16-bit float atomics: a compare-and-swap loop on the raw bits (an atomic access for the memory
// checker too, like every atomic here).
namespace simt {
template <class T, class Bits, class F>
inline T atomic_bits_rmw(T* p, F f) {
  static_assert(sizeof(T) == sizeof(Bits));
  Bits old = atomic_rmw(reinterpret_cast<Bits*>(p), [&](Bits o) { return simt_bitcast<Bits>(f(simt_bitcast<T>(o))); });
  return simt_bitcast<T>(old);
}
}  // namespace simt
inline __half atomicAdd(__half* p, __half v) {
  return ::simt::atomic_bits_rmw<__half, unsigned short>(p, [v](__half o) { return __half(o + v); }); }
inline __nv_bfloat16 atomicAdd(__nv_bfloat16* p, __nv_bfloat16 v) {
  return ::simt::atomic_bits_rmw<__nv_bfloat16, unsigned short>(p, [v](__nv_bfloat16 o) { return __nv_bfloat16(o + v); }); }
inline __half2 atomicAdd(__half2* p, __half2 v) {
  return ::simt::atomic_bits_rmw<__half2, unsigned int>(p, [v](__half2 o) { return __hadd2(o, v); }); }
inline __nv_bfloat162 atomicAdd(__nv_bfloat162* p, __nv_bfloat162 v) {
  return ::simt::atomic_bits_rmw<__nv_bfloat162, unsigned int>(p, [v](__nv_bfloat162 o) { return __hadd2(o, v); }); }
inline int atomicSub(int* p, int v) { return std::atomic_ref<int>(*p).fetch_sub(v, std::memory_order_relaxed); }
inline unsigned int atomicSub(unsigned int* p, unsigned int v) { return std::atomic_ref<unsigned>(*p).fetch_sub(v, std::memory_order_relaxed); }
#define SIMT_ATOMIC_MINMAX(T)                                                                          \
  inline T atomicMax(T* p, T v) { return ::simt::atomic_rmw(p, [v](T o) { return o > v ? o : v; }); } \
  inline T atomicMin(T* p, T v) { return ::simt::atomic_rmw(p, [v](T o) { return o < v ? o : v; }); }
SIMT_ATOMIC_MINMAX(int)
SIMT_ATOMIC_MINMAX(unsigned int)
SIMT_ATOMIC_MINMAX(long long)
SIMT_ATOMIC_MINMAX(unsigned long long)
#undef SIMT_ATOMIC_MINMAX
#define SIMT_ATOMIC_BITS(T)                                                                                      \
  inline T atomicAnd(T* p, T v) { return std::atomic_ref<T>(*p).fetch_and(v, std::memory_order_relaxed); }       \
  inline T atomicOr(T* p, T v) { return std::atomic_ref<T>(*p).fetch_or(v, std::memory_order_relaxed); }         \
  inline T atomicXor(T* p, T v) { return std::atomic_ref<T>(*p).fetch_xor(v, std::memory_order_relaxed); }       \
  inline T atomicExch(T* p, T v) { return std::atomic_ref<T>(*p).exchange(v, std::memory_order_relaxed); }       \
  inline T atomicCAS(T* p, T cmp, T v) {                                                                         \
    std::atomic_ref<T>(*p).compare_exchange_strong(cmp, v, std::memory_order_relaxed); return cmp; }
SIMT_ATOMIC_BITS(int)
SIMT_ATOMIC_BITS(unsigned int)
SIMT_ATOMIC_BITS(unsigned long long)
#undef SIMT_ATOMIC_BITS
inline unsigned short atomicCAS(unsigned short* p, unsigned short cmp, unsigned short v) {
  std::atomic_ref<unsigned short>(*p).compare_exchange_strong(cmp, v, std::memory_order_relaxed); return cmp; }
inline float atomicExch(float* p, float v) { return std::atomic_ref<float>(*p).exchange(v, std::memory_order_relaxed); }
inline unsigned int atomicInc(unsigned int* p, unsigned int lim) { return ::simt::atomic_rmw(p, [lim](unsigned o) { return o >= lim ? 0u : o + 1u; }); }
inline unsigned int atomicDec(unsigned int* p, unsigned int lim) { return ::simt::atomic_rmw(p, [lim](unsigned o) { return (o == 0u || o > lim) ? lim : o - 1u; }); }
#define SIMT_ATOMIC_SCOPED(name)                                                                     \
  template <class... A> inline auto name##_block(A... a) -> decltype(name(a...)) { return name(a...); } \
  template <class... A> inline auto name##_system(A... a) -> decltype(name(a...)) { return name(a...); }
SIMT_ATOMIC_SCOPED(atomicAdd) SIMT_ATOMIC_SCOPED(atomicSub) SIMT_ATOMIC_SCOPED(atomicMax) SIMT_ATOMIC_SCOPED(atomicMin)
SIMT_ATOMIC_SCOPED(atomicAnd) SIMT_ATOMIC_SCOPED(atomicOr) SIMT_ATOMIC_SCOPED(atomicXor) SIMT_ATOMIC_SCOPED(atomicExch)
SIMT_ATOMIC_SCOPED(atomicCAS) SIMT_ATOMIC_SCOPED(atomicInc) SIMT_ATOMIC_SCOPED(atomicDec)
#undef SIMT_ATOMIC_SCOPED

// ---------------------------------------------------------------- host runtime API
cudaError_t cudaMalloc(void** p, size_t n);
template <class T> inline cudaError_t cudaMalloc(T** p, size_t n) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
inline cudaError_t cudaMallocAsync(void** p, size_t n, cudaStream_t) { return cudaMalloc(p, n); }
template <class T> inline cudaError_t cudaMallocAsync(T** p, size_t n, cudaStream_t) { return cudaMalloc(reinterpret_cast<void**>(p), n); }
cudaError_t cudaFree(void* p);
inline cudaError_t cudaFreeAsync(void* p, cudaStream_t) { return cudaFree(p); }
inline cudaError_t cudaMallocHost(void** p, size_t n) { return ::simt::alloc(p, n, "cudaMallocHost", false); }
template <class T> inline cudaError_t cudaMallocHost(T** p, size_t n) { return cudaMallocHost(reinterpret_cast<void**>(p), n); }
inline cudaError_t cudaHostAlloc(void** p, size_t n, unsigned) { return ::simt::alloc(p, n, "cudaHostAlloc", false); }
inline cudaError_t cudaFreeHost(void* p) { return cudaFree(p); }
inline cudaError_t cudaMallocManaged(void** p, size_t n, unsigned = 1) { return ::simt::alloc(p, n, "cudaMallocManaged", false); }
inline cudaError_t cudaMemcpy(void* d, const void* s, size_t n, cudaMemcpyKind) { ::simt::host_copy(d, s, n); return ::simt::sticky_error(); }
inline cudaError_t cudaMemcpyAsync(void* d, const void* s, size_t n, cudaMemcpyKind k, cudaStream_t = 0) { return cudaMemcpy(d, s, n, k); }
inline cudaError_t cudaMemcpy2D(void* d, size_t dp, const void* s, size_t sp, size_t w, size_t h, cudaMemcpyKind) {
  for (size_t r = 0; r < h; ++r) ::simt::host_copy((char*)d + r * dp, (const char*)s + r * sp, w);
  return ::simt::sticky_error();
}
inline cudaError_t cudaMemcpy2DAsync(void* d, size_t dp, const void* s, size_t sp, size_t w, size_t h, cudaMemcpyKind k, cudaStream_t = 0) {
  return cudaMemcpy2D(d, dp, s, sp, w, h, k); }
inline cudaError_t cudaMemset(void* d, int v, size_t n) { ::simt::host_memset(d, v, n); return ::simt::sticky_error(); }
inline cudaError_t cudaMemsetAsync(void* d, int v, size_t n, cudaStream_t = 0) { return cudaMemset(d, v, n); }
template <class T> inline cudaError_t cudaMemcpyToSymbol(T& sym, const void* src, size_t n, size_t off = 0, cudaMemcpyKind = cudaMemcpyHostToDevice) {
  std::memcpy(reinterpret_cast<char*>(&sym) + off, src, n); return cudaSuccess; }
template <class T> inline cudaError_t cudaMemcpyToSymbolAsync(T& sym, const void* src, size_t n, size_t off = 0, cudaMemcpyKind = cudaMemcpyHostToDevice, cudaStream_t = 0) {
  std::memcpy(reinterpret_cast<char*>(&sym) + off, src, n); return cudaSuccess; }
template <class T> inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& sym, size_t n, size_t off = 0, cudaMemcpyKind = cudaMemcpyDeviceToHost) {
  std::memcpy(dst, reinterpret_cast<const char*>(&sym) + off, n); return cudaSuccess; }
template <class T> inline cudaError_t cudaGetSymbolAddress(void** p, T& sym) { *p = (void*)&sym; return cudaSuccess; }
inline cudaError_t cudaStreamSynchronize(cudaStream_t) { return ::simt::sticky_error(); }
inline cudaError_t cudaDeviceSynchronize() { return ::simt::sticky_error(); }
inline cudaError_t cudaStreamCreate(cudaStream_t* s) { *s = (cudaStream_t)0x10; return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithFlags(cudaStream_t* s, unsigned) { *s = (cudaStream_t)0x10; return cudaSuccess; }
inline cudaError_t cudaStreamCreateWithPriority(cudaStream_t* s, unsigned, int) { *s = (cudaStream_t)0x10; return cudaSuccess; }
inline cudaError_t cudaStreamDestroy(cudaStream_t) { return cudaSuccess; }
inline cudaError_t cudaStreamQuery(cudaStream_t) { return ::simt::sticky_error(); }
inline cudaError_t cudaStreamWaitEvent(cudaStream_t, cudaEvent_t, unsigned = 0) { return cudaSuccess; }
inline cudaError_t cudaEventCreate(cudaEvent_t* e) { *e = (cudaEvent_t)0x20; return cudaSuccess; }
inline cudaError_t cudaEventCreateWithFlags(cudaEvent_t* e, unsigned) { *e = (cudaEvent_t)0x20; return cudaSuccess; }
inline cudaError_t cudaEventRecord(cudaEvent_t, cudaStream_t = 0) { return cudaSuccess; }
inline cudaError_t cudaEventSynchronize(cudaEvent_t) { return ::simt::sticky_error(); }
inline cudaError_t cudaEventQuery(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t, cudaEvent_t) { *ms = 0.0f; return cudaSuccess; }
inline cudaError_t cudaEventDestroy(cudaEvent_t) { return cudaSuccess; }
inline cudaError_t cudaGetLastError() { return ::simt::get_last_error(true); }
inline cudaError_t cudaPeekAtLastError() { return ::simt::get_last_error(false); }
const char* cudaGetErrorString(cudaError_t e);
const char* cudaGetErrorName(cudaError_t e);
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaGetDeviceCount(int* n) { *n = 1; return cudaSuccess; }
inline cudaError_t cudaDeviceReset() { return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int dev);
cudaError_t cudaGetDeviceProperties(cudaDeviceProp* p, int dev);
inline cudaError_t cudaDeviceSetCacheConfig(cudaFuncCache) { return cudaSuccess; }
inline cudaError_t cudaFuncSetAttribute(const void* f, cudaFuncAttribute a, int v) {
  if (a == cudaFuncAttributeMaxDynamicSharedMemorySize) {
    if (v < 0 || v > 232448) return cudaErrorInvalidValue;
    ::simt::set_max_dyn_smem(f, v);
  }
  return cudaSuccess;
}
template <class... P> inline cudaError_t cudaFuncSetAttribute(void (*f)(P...), cudaFuncAttribute a, int v) {
  return cudaFuncSetAttribute(reinterpret_cast<const void*>(f), a, v); }
template <class F> inline cudaError_t cudaFuncSetCacheConfig(F*, cudaFuncCache) { return cudaSuccess; }
inline cudaError_t cudaFuncSetCacheConfig(const void*, cudaFuncCache) { return cudaSuccess; }
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, const void* f) {
  std::memset(a, 0, sizeof(*a)); a->maxThreadsPerBlock = 1024; a->numRegs = 32; a->ptxVersion = 90; a->binaryVersion = 90;
  a->maxDynamicSharedSizeBytes = ::simt::get_max_dyn_smem(f); return cudaSuccess; }
template <class... P> inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* a, void (*f)(P...)) {
  return cudaFuncGetAttributes(a, reinterpret_cast<const void*>(f)); }
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, const void*, int block, size_t smem) {
  if (block <= 0 || block > 1024) { *n = 0; return cudaErrorInvalidValue; }
  int warps = (block + 31) / 32;
  int b = std::min(32, 64 / warps);
  if (smem > 0) b = std::min<long long>(b, 233472LL / (long long)(smem + 1024));
  *n = b; return cudaSuccess;
}
template <class F> inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F* f, int block, size_t smem) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, reinterpret_cast<const void*>(f), block, smem); }
template <class F> inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, F f, int block, size_t smem, unsigned) {
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(n, f, block, smem); }

// ---------------------------------------------------------------- kernel launch
// kernel<<<g, b, s, st>>>(args) is rewritten by tests/simt/rewrite.py into
// ::simt::launcher(kernel, "kernel", g, b, s, st)(args).
namespace simt {
template <class... P>
struct Launcher {
  void (*fn)(P...);
  const char* name;
  dim3 grid, block;
  size_t smem;
  cudaStream_t stream;
  template <class... A>
  cudaError_t operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with the wrong number of arguments");
    struct Data {
      void (*fn)(P...);
      std::tuple<std::decay_t<P>...> args;
    } data{fn, std::tuple<std::decay_t<P>...>(static_cast<std::decay_t<P>>(std::forward<A>(a))...)};
    LaunchDesc d{name, reinterpret_cast<const void*>(fn), grid, block, smem, stream,
                 [](void* p) { Data* dd = static_cast<Data*>(p); std::apply(dd->fn, dd->args); }, &data,
                 sizeof(Data)};
    return launch(d);
  }
};
template <class... P>
inline Launcher<P...> launcher(void (*fn)(P...), const char* name, dim3 grid, dim3 block, size_t smem = 0,
                               cudaStream_t stream = 0) {
  return Launcher<P...>{fn, name, grid, block, smem, stream};
}
template <class... P, size_t... I>
inline cudaError_t launch_from_array(void (*fn)(P...), dim3 g, dim3 b, void** args, size_t smem, cudaStream_t st,
                                     std::index_sequence<I...>) {
  return launcher(fn, "cudaLaunchKernel", g, b, smem, st)(*static_cast<std::decay_t<P>*>(args[I])...);
}
}  // namespace simt
template <class... P>
inline cudaError_t cudaLaunchKernel(void (*fn)(P...), dim3 g, dim3 b, void** args, size_t smem = 0, cudaStream_t st = 0) {
  return ::simt::launch_from_array(fn, g, b, args, smem, st, std::index_sequence_for<P...>{});
}

#endif  // L2R_SIMT_H_
