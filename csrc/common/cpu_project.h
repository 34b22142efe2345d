// CPU projection of one token onto the routing space: out[i] = <W[i], x> for the r rows of W, and
// <x, x> for RMSNorm, in one pass over x per group of 8 rows (x stays in L1, each W row streams
// once). AVX2+FMA when the CPU has it (checked once at run time), portable loops otherwise. The
// summation order is fixed per machine, so results never depend on threads or on the batch.
#pragma once

#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define L2R_HAVE_AVX2_PATH 1
#endif

namespace l2r {
namespace cpu {

#if defined(L2R_HAVE_AVX2_PATH)
__attribute__((target("avx2,fma"))) static inline float hsum_avx2(__m256 v) {
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 0x1)));
}

// ROWS rows of W against x; with_squares also sums x*x.
template <int ROWS>
__attribute__((target("avx2,fma"))) static inline void project_rows_avx2(
    const float* x, const float* W, int64_t d, float* out, float* squares) {
  __m256 acc[ROWS];
  for (int j = 0; j < ROWS; ++j) acc[j] = _mm256_setzero_ps();
  __m256 sq = _mm256_setzero_ps();
  const int64_t dv = d & ~int64_t(7);
  for (int64_t i = 0; i < dv; i += 8) {
    const __m256 xv = _mm256_loadu_ps(x + i);
    if (squares) sq = _mm256_fmadd_ps(xv, xv, sq);
    for (int j = 0; j < ROWS; ++j) acc[j] = _mm256_fmadd_ps(xv, _mm256_loadu_ps(W + j * d + i), acc[j]);
  }
  for (int j = 0; j < ROWS; ++j) {
    float s = hsum_avx2(acc[j]);
    for (int64_t i = dv; i < d; ++i) s += W[j * d + i] * x[i];
    out[j] = s;
  }
  if (squares) {
    float s = hsum_avx2(sq);
    for (int64_t i = dv; i < d; ++i) s += x[i] * x[i];
    *squares = s;
  }
}

__attribute__((target("avx2,fma"))) static inline void project_avx2(const float* x, const float* W,
                                                                    int64_t d, int rank, float* out,
                                                                    float* squares) {
  for (int r0 = 0; r0 < rank; r0 += 8) {
    float* sq = r0 == 0 ? squares : nullptr;
    const float* Wg = W + r0 * d;
    switch (rank - r0 < 8 ? rank - r0 : 8) {
      case 1: project_rows_avx2<1>(x, Wg, d, out + r0, sq); break;
      case 2: project_rows_avx2<2>(x, Wg, d, out + r0, sq); break;
      case 3: project_rows_avx2<3>(x, Wg, d, out + r0, sq); break;
      case 4: project_rows_avx2<4>(x, Wg, d, out + r0, sq); break;
      case 5: project_rows_avx2<5>(x, Wg, d, out + r0, sq); break;
      case 6: project_rows_avx2<6>(x, Wg, d, out + r0, sq); break;
      case 7: project_rows_avx2<7>(x, Wg, d, out + r0, sq); break;
      default: project_rows_avx2<8>(x, Wg, d, out + r0, sq); break;
    }
  }
}

// L2R_CPU_PORTABLE=1 forces the portable path, which calls route_math.cuh's helpers directly: the
// tests run it to check the per-token math the CUDA kernels share, on AVX2 machines too.
static inline bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                          std::getenv("L2R_CPU_PORTABLE") == nullptr;
  return has;
}
#endif

template <typename acc_t>
static inline void project_portable(const acc_t* x, const acc_t* W, int64_t d, int rank, acc_t* out,
                                    acc_t* squares) {
  for (int j = 0; j < rank; ++j) {
    acc_t s = 0;
    for (int64_t i = 0; i < d; ++i) s += W[j * d + i] * x[i];
    out[j] = s;
  }
  if (squares) {
    acc_t s = 0;
    for (int64_t i = 0; i < d; ++i) s += x[i] * x[i];
    *squares = s;
  }
}

// out[j] = <W[j], x> for j < rank (W row-major [rank, d]); *squares = <x, x> when squares != null.
static inline void project(const float* x, const float* W, int64_t d, int rank, float* out,
                           float* squares) {
#if defined(L2R_HAVE_AVX2_PATH)
  if (cpu_has_avx2()) return project_avx2(x, W, d, rank, out, squares);
#endif
  project_portable(x, W, d, rank, out, squares);
}

static inline void project(const double* x, const double* W, int64_t d, int rank, double* out,
                           double* squares) {
  project_portable(x, W, d, rank, out, squares);
}

}  // namespace cpu
}  // namespace l2r
