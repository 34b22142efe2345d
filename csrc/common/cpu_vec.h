// Vectorized dot/axpy for the CPU kernels' d-long loops (the projection onto the routing space).
// Built twice, for x86-64-v3 (AVX2 + FMA) and the baseline, and picked at load time, so one wheel
// runs everywhere and uses AVX2 where present.
#pragma once

#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define L2R_CPU_MULTIVERSION __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define L2R_CPU_MULTIVERSION
#endif

namespace l2r {
namespace cpu {

// sum_i a[i] * b[i]. Eight independent partial sums let the compiler use full vectors without
// -ffast-math; the summation order is fixed, so results do not depend on threads.
L2R_CPU_MULTIVERSION static inline float dot(const float* a, const float* b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    for (int j = 0; j < 16; ++j) acc[j] += a[i + j] * b[i + j];
  }
  float s = 0;
  for (int j = 0; j < 16; ++j) s += acc[j];
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

static inline double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// y[i] += alpha * x[i]
L2R_CPU_MULTIVERSION static inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

static inline void axpy(double alpha, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace cpu
}  // namespace l2r
