// Portability layer: the same inline function compiles for the host (g++) and the device (nvcc).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define L2R_HD __host__ __device__ __forceinline__
#else
#define L2R_HD inline
#endif

namespace l2r {

// Overloads instead of std:: so that device code never depends on the host standard library, and
// float math stays in float (expf, not exp promoted to double).
L2R_HD float math_exp(float v) { return expf(v); }
L2R_HD double math_exp(double v) { return exp(v); }
L2R_HD float math_log(float v) { return logf(v); }
L2R_HD double math_log(double v) { return log(v); }
L2R_HD float math_tanh(float v) { return tanhf(v); }
L2R_HD double math_tanh(double v) { return tanh(v); }
L2R_HD float math_sqrt(float v) { return sqrtf(v); }
L2R_HD double math_sqrt(double v) { return sqrt(v); }
L2R_HD bool math_isnan(float v) { return v != v; }
L2R_HD bool math_isnan(double v) { return v != v; }
L2R_HD float math_max(float a, float b) { return a > b ? a : b; }
L2R_HD double math_max(double a, double b) { return a > b ? a : b; }

template <typename acc_t>
L2R_HD acc_t math_neg_inf() { return -static_cast<acc_t>(INFINITY); }

}  // namespace l2r
