// Vectorized axpy for the portable CPU backward's d-long loops (through the projection).
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

// y[i] += alpha * x[i]
L2R_CPU_MULTIVERSION static inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

static inline void axpy(double alpha, const double* x, double* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace cpu
}  // namespace l2r
