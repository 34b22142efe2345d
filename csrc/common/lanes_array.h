// Array lanes: N floats of one thread as a lane type of width N (host and device).
//
// The CUDA route kernels hold several tokens per thread (a token tile) and run the per-token math
// of csrc/route/math on all of them at once with V = ArrayLanes<N>: an operand that is the same for
// every token (an anchor coordinate loaded once from shared memory) is broadcast, so one load serves
// N tokens. Every operation is the scalar float operation of lanes.h applied element by element, so
// a formula gives each token exactly the bits it gives a scalar lane (tests/cpp/lane_math_check.cpp).
// The elements live in registers as long as every index is a compile-time constant (the loops below
// are unrolled).
#pragma once

#include "lanes.h"

namespace l2r {
namespace lanes {
L2R_ISA_BEGIN

template <int N>
struct ArrayMask {
  bool v[N];
};

template <int N>
struct ArrayInt {
  int32_t v[N];
  ArrayInt() = default;
  L2R_HD explicit ArrayInt(int32_t s) {
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = s;
  }
};

template <int N>
struct ArrayLanes {
  float v[N];
  ArrayLanes() = default;
  L2R_HD ArrayLanes(float s) {  // broadcast (implicit, as V(x) is for every lane type)
#pragma unroll
    for (int i = 0; i < N; ++i) v[i] = s;
  }
  L2R_HD ArrayLanes(int s) : ArrayLanes(static_cast<float>(s)) {}  // V(0), V(1) of the math
  L2R_HD explicit ArrayLanes(int64_t s) : ArrayLanes(static_cast<float>(s)) {}
  L2R_HD float& operator[](int i) { return v[i]; }
  L2R_HD float operator[](int i) const { return v[i]; }
};

template <int N>
struct LaneTraits<ArrayLanes<N>> {
  using Mask = ArrayMask<N>;
  using Int = ArrayInt<N>;
  using Scalar = float;
  static constexpr int width = N;
};

#define L2R_ARRAY_BINARY(OP)                                                          \
  template <int N>                                                                    \
  L2R_HD ArrayLanes<N> operator OP(ArrayLanes<N> a, ArrayLanes<N> b) {                \
    ArrayLanes<N> r;                                                                  \
    _Pragma("unroll") for (int i = 0; i < N; ++i) r.v[i] = a.v[i] OP b.v[i];          \
    return r;                                                                         \
  }
L2R_ARRAY_BINARY(+)
L2R_ARRAY_BINARY(-)
L2R_ARRAY_BINARY(*)
L2R_ARRAY_BINARY(/)
#undef L2R_ARRAY_BINARY

template <int N>
L2R_HD ArrayLanes<N>& operator+=(ArrayLanes<N>& a, ArrayLanes<N> b) {
  return a = a + b;
}

#define L2R_ARRAY_MAP(NAME, EXPR)                           \
  template <int N>                                          \
  L2R_HD ArrayLanes<N> NAME(ArrayLanes<N> a) {              \
    ArrayLanes<N> r;                                        \
    _Pragma("unroll") for (int i = 0; i < N; ++i) {         \
      const float x = a.v[i];                               \
      r.v[i] = EXPR;                                        \
    }                                                       \
    return r;                                               \
  }
L2R_ARRAY_MAP(vabs, vabs(x))
L2R_ARRAY_MAP(vsqrt, vsqrt(x))
L2R_ARRAY_MAP(vrint, vrint(x))
#undef L2R_ARRAY_MAP

template <int N>
L2R_HD ArrayLanes<N> fmadd(ArrayLanes<N> a, ArrayLanes<N> b, ArrayLanes<N> c) {
  ArrayLanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = fmadd(a.v[i], b.v[i], c.v[i]);
  return r;
}

template <int N>
L2R_HD ArrayLanes<N> vmax(ArrayLanes<N> a, ArrayLanes<N> b) {
  ArrayLanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = vmax(a.v[i], b.v[i]);
  return r;
}

template <int N>
L2R_HD ArrayLanes<N> vmin(ArrayLanes<N> a, ArrayLanes<N> b) {
  ArrayLanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = vmin(a.v[i], b.v[i]);
  return r;
}

#define L2R_ARRAY_COMPARE(NAME, OP)                                      \
  template <int N>                                                       \
  L2R_HD ArrayMask<N> NAME(ArrayLanes<N> a, ArrayLanes<N> b) {           \
    ArrayMask<N> m;                                                      \
    _Pragma("unroll") for (int i = 0; i < N; ++i) m.v[i] = a.v[i] OP b.v[i]; \
    return m;                                                            \
  }
L2R_ARRAY_COMPARE(lt, <)
L2R_ARRAY_COMPARE(le, <=)
L2R_ARRAY_COMPARE(gt, >)
L2R_ARRAY_COMPARE(ge, >=)
L2R_ARRAY_COMPARE(eq, ==)
#undef L2R_ARRAY_COMPARE

template <int N>
L2R_HD ArrayMask<N> is_nan(ArrayLanes<N> a) {
  ArrayMask<N> m;
#pragma unroll
  for (int i = 0; i < N; ++i) m.v[i] = a.v[i] != a.v[i];
  return m;
}

template <int N>
L2R_HD ArrayLanes<N> select(ArrayMask<N> m, ArrayLanes<N> a, ArrayLanes<N> b) {
  ArrayLanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = m.v[i] ? a.v[i] : b.v[i];
  return r;
}

template <int N>
L2R_HD ArrayMask<N> mask_and(ArrayMask<N> a, ArrayMask<N> b) {
  ArrayMask<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = a.v[i] && b.v[i];
  return r;
}

template <int N>
L2R_HD ArrayMask<N> mask_or(ArrayMask<N> a, ArrayMask<N> b) {
  ArrayMask<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = a.v[i] || b.v[i];
  return r;
}

template <int N>
L2R_HD ArrayMask<N> mask_not(ArrayMask<N> a) {
  ArrayMask<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = !a.v[i];
  return r;
}

template <int N>
L2R_HD bool any_of(ArrayMask<N> a) {
  bool r = false;
#pragma unroll
  for (int i = 0; i < N; ++i) r = r || a.v[i];
  return r;
}

// ---- 32-bit integer view ------------------------------------------------------------------------

template <int N>
L2R_HD ArrayInt<N> to_bits(ArrayLanes<N> a) {
  ArrayInt<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = to_bits(a.v[i]);
  return r;
}

template <int N>
L2R_HD ArrayLanes<N> from_bits(ArrayInt<N> a) {
  ArrayLanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = from_bits(a.v[i]);
  return r;
}

template <int N>
L2R_HD ArrayLanes<N> to_float(ArrayInt<N> a) {
  ArrayLanes<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = to_float(a.v[i]);
  return r;
}

template <int N>
L2R_HD ArrayInt<N> to_int(ArrayLanes<N> a) {
  ArrayInt<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = to_int(a.v[i]);
  return r;
}

#define L2R_ARRAY_INT_BINARY(OP)                                                  \
  template <int N>                                                                \
  L2R_HD ArrayInt<N> operator OP(ArrayInt<N> a, ArrayInt<N> b) {                  \
    ArrayInt<N> r;                                                                \
    _Pragma("unroll") for (int i = 0; i < N; ++i) r.v[i] = a.v[i] OP b.v[i];      \
    return r;                                                                     \
  }
L2R_ARRAY_INT_BINARY(+)
L2R_ARRAY_INT_BINARY(-)
L2R_ARRAY_INT_BINARY(&)
L2R_ARRAY_INT_BINARY(|)
#undef L2R_ARRAY_INT_BINARY

template <int N>
L2R_HD ArrayInt<N> shift_right(ArrayInt<N> a, int n) {
  ArrayInt<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = shift_right(a.v[i], n);
  return r;
}

template <int N>
L2R_HD ArrayInt<N> shift_left(ArrayInt<N> a, int n) {
  ArrayInt<N> r;
#pragma unroll
  for (int i = 0; i < N; ++i) r.v[i] = shift_left(a.v[i], n);
  return r;
}

L2R_ISA_END
}  // namespace lanes
}  // namespace l2r
