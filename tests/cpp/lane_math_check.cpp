// Every lane width computes the route math helpers bit for bit like the scalar lane (the one the
// portable CPU path and every CUDA thread use): each helper is evaluated on random and edge inputs
// (NaN, +-inf, denormals, +-0, huge and tiny values) with the SIMD lane type given at compile time
// (-DLANES=8: AVX2 Vec8f, -DLANES=16: AVX-512 Vec16f, -DLANES=4: ArrayLanes<4>, the token tiles of
// the CUDA forward) and lane by lane with float, and the bits compared. Also the in-register
// bf16/fp16 loads and stores against the scalar conversions (SIMD lane types).
// Built and run by tests/test_lane_math.py; prints "OK <checks>" or the first mismatch.
#if LANES == 8
#pragma GCC target("avx2,fma,f16c")
#define L2R_ISA avx2
#include "common/lanes_avx2.h"
#elif LANES == 16
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#define L2R_ISA avx512
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common/lanes_avx512.h"
#elif LANES == 4
#include "common/lanes_array.h"
#else
#error "compile with -DLANES=4, -DLANES=8 or -DLANES=16"
#endif

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "common/half_bits.h"
#include "route/math/all.h"

using namespace l2r::lanes;
namespace rm = l2r::route::math;

#if LANES == 8
using V = Vec8f;
#elif LANES == 16
using V = Vec16f;
#else
using V = ArrayLanes<4>;
#endif
constexpr int W = LANES;

static long checks = 0;

static uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// Equal bits, or both NaN (NaN payloads are not part of the contract).
static bool same(float a, float b) { return bits_of(a) == bits_of(b) || (a != a && b != b); }

#if LANES == 4
static V load(const float* p) {
  V v;
  for (int j = 0; j < W; ++j) v[j] = p[j];
  return v;
}
static void store(float* p, V v) {
  for (int j = 0; j < W; ++j) p[j] = v[j];
}
#else
static V load(const float* p) { return LaneIO<V>::load(p); }
static void store(float* p, V v) { LaneIO<V>::store(p, v); }
#endif

[[noreturn]] static void fail(const char* what, int lane, const float* in, int n_in, float got, float want) {
  std::printf("MISMATCH %s lane %d inputs", what, lane);
  for (int i = 0; i < n_in; ++i) std::printf(" %.9g(0x%08x)", in[i], bits_of(in[i]));
  std::printf(": lanes %.9g (0x%08x) scalar %.9g (0x%08x)\n", got, bits_of(got), want, bits_of(want));
  std::exit(1);
}

// Checks f_v(lanes of args) == f_s(args) lane by lane for every block of W inputs.
template <int N, typename FV, typename FS>
static void check(const char* what, const std::vector<float>* args, FV&& f_v, FS&& f_s) {
  const size_t n = args[0].size();
  for (size_t b = 0; b + W <= n; b += W) {
    V in[N];
    for (int k = 0; k < N; ++k) in[k] = load(args[k].data() + b);
    float out[W];
    store(out, f_v(in));
    for (int j = 0; j < W; ++j) {
      float s_in[N];
      for (int k = 0; k < N; ++k) s_in[k] = args[k][b + j];
      const float want = f_s(s_in);
      ++checks;
      if (!same(out[j], want)) fail(what, j, s_in, N, out[j], want);
    }
  }
}

static std::vector<float> edge_values() {
  const float inf = __builtin_huge_valf();
  std::vector<float> v = {0.0f, -0.0f, inf, -inf, __builtin_nanf(""), -__builtin_nanf(""),
                          1e-45f, -1e-45f, 1.17549435e-38f, 1e-39f, 3.4e38f, -3.4e38f, 88.72f,
                          88.73f, -86.0f, -86.01f, -103.0f, 0.625f, -0.625f, 0.6249999f, 9.0f,
                          44.0f, -44.0f, 1.0f, -1.0f, 0.5f, 2.0f, 1e-6f, 1e-7f, 2147483648.0f};
  return v;
}

// n values: the edge values, then log-uniform magnitudes of both signs, then plain normals.
static std::vector<float> inputs(std::mt19937& rng, size_t n, float lo_exp = -40, float hi_exp = 40) {
  std::vector<float> v = edge_values();
  std::uniform_real_distribution<float> e(lo_exp, hi_exp), sign(0, 1);
  std::normal_distribution<float> normal(0, 3);
  while (v.size() < n / 2) v.push_back((sign(rng) < 0.5f ? -1 : 1) * std::exp2(e(rng)));
  while (v.size() < n) v.push_back(normal(rng));
  std::shuffle(v.begin(), v.end(), rng);
  v.resize(n / W * W);
  return v;
}

// Every stride-th float bit pattern (both signs, every exponent, denormals, inf and NaN): the exp and
// log exponent steps a lane type may do with its own instructions (fastmath.h's times_pow2 and
// exponent_mantissa; AVX-512 overrides both) must give the generic steps' bits everywhere.
static std::vector<float> bit_sweep(uint32_t stride) {
  std::vector<float> v;
  for (uint64_t u = 0; u < (uint64_t(1) << 32); u += stride) {
    const uint32_t bits = static_cast<uint32_t>(u);
    float f;
    std::memcpy(&f, &bits, 4);
    v.push_back(f);
  }
  v.resize(v.size() / W * W);
  return v;
}

int main() {
  std::mt19937 rng(12345);
  const size_t n = 1 << 18;
  const std::vector<float> a = inputs(rng, n), b = inputs(rng, n), c = inputs(rng, n), d = inputs(rng, n);
  std::vector<float> pos(a.size());
  for (size_t i = 0; i < a.size(); ++i) pos[i] = std::fabs(a[i]);
  std::vector<float> beta(a.size()), eps(a.size());
  std::uniform_real_distribution<float> unit(0, 1);
  for (size_t i = 0; i < a.size(); ++i) {
    beta[i] = i % 7 == 0 ? 0.0f : (i % 7 == 1 ? 1.0f : unit(rng));
    eps[i] = i % 3 == 0 ? 1e-6f : 0.5f;
  }
  const std::vector<float> A1[] = {a}, A2[] = {a, b}, A3[] = {a, b, c}, A4[] = {a, b, c, d};

  check<1>("vexp", A1, [](V* x) { return vexp(x[0]); }, [](float* x) { return vexp(x[0]); });
  check<1>("vlog", A1, [](V* x) { return vlog(x[0]); }, [](float* x) { return vlog(x[0]); });
  const std::vector<float> P1[] = {pos};
  check<1>("vlog(|x|)", P1, [](V* x) { return vlog(x[0]); }, [](float* x) { return vlog(x[0]); });
  const std::vector<float> S1[] = {bit_sweep(1021)};
  check<1>("vexp (bit sweep)", S1, [](V* x) { return vexp(x[0]); }, [](float* x) { return vexp(x[0]); });
  check<1>("vlog (bit sweep)", S1, [](V* x) { return vlog(x[0]); }, [](float* x) { return vlog(x[0]); });
  check<1>("vtanh", A1, [](V* x) { return vtanh(x[0]); }, [](float* x) { return vtanh(x[0]); });

  const std::vector<float> C3[] = {pos, beta, eps};
  check<3>("sips_norm_coef.coef", C3, [](V* x) { return rm::sips_norm_coef(x[0], x[1], x[2]).coef; },
           [](float* x) { return rm::sips_norm_coef(x[0], x[1], x[2]).coef; });
  check<3>("sips_norm_coef.radial", C3, [](V* x) { return rm::sips_norm_coef(x[0], x[1], x[2]).radial; },
           [](float* x) { return rm::sips_norm_coef(x[0], x[1], x[2]).radial; });

  // Staged anchor log-sum-exp of H = 3 scores (u = args), q_scale = d, tau = |c| + 0.1.
  auto expert = [](auto* x) {
    using T = std::remove_reference_t<decltype(x[0])>;
    const T tau = vabs(x[2]) + T(0.1f);
    const T q_scale = x[3];
    const T sot = q_scale / tau;
    T us[3] = {x[0], x[1], x[0] * x[1]};
    return rm::expert_logit<T>(3, q_scale, sot, tau, [&](int h) { return us[h]; }, [](int, T) {});
  };
  check<4>("expert_logit.logit", A4, [&](V* x) { return expert(x).logit; }, [&](float* x) { return expert(x).logit; });
  check<4>("expert_logit.lsum", A4, [&](V* x) { return expert(x).lsum; }, [&](float* x) { return expert(x).lsum; });
  check<3>("anchor_share", A3, [](V* x) { return rm::anchor_share(3, x[0], vabs(x[1])); },
           [](float* x) { return rm::anchor_share(3, x[0], vabs(x[1])); });
  check<2>("anchor_dot", A2, [](V* x) {
             const float q[3] = {0.25f, -1.5f, 3.0f};
             return rm::anchor_dot<V>(q, 3, [&](int i) { return x[i % 2] * V(float(i + 1)); });
           },
           [](float* x) {
             const float q[3] = {0.25f, -1.5f, 3.0f};
             return rm::anchor_dot<float>(q, 3, [&](int i) { return x[i % 2] * float(i + 1); });
           });

  check<3>("logit_exp", A3, [](V* x) { return rm::logit_exp(x[0], x[1]); }, [](float* x) { return rm::logit_exp(x[0], x[1]); });
  for (bool sigmoid : {false, true}) {
    check<3>(sigmoid ? "routing_prob(sigmoid)" : "routing_prob(softmax)", A3,
             [&](V* x) { return rm::routing_prob(x[0], x[1], x[2], sigmoid); },
             [&](float* x) { return rm::routing_prob(x[0], x[1], x[2], sigmoid); });
    check<2>("balance_prob", A2, [&](V* x) { return rm::balance_prob(x[0], x[1], sigmoid); },
             [&](float* x) { return rm::balance_prob(x[0], x[1], sigmoid); });
    check<3>("balance_prob_grad", A3, [&](V* x) { return rm::balance_prob_grad(x[0], x[1], x[2], sigmoid); },
             [&](float* x) { return rm::balance_prob_grad(x[0], x[1], x[2], sigmoid); });
    check<4>("logit_grad", A4, [&](V* x) { return rm::logit_grad(x[0], x[1], x[2], x[3], x[1] * x[3], sigmoid); },
             [&](float* x) { return rm::logit_grad(x[0], x[1], x[2], x[3], x[1] * x[3], sigmoid); });
  }
  check<2>("softmax_of", A2, [](V* x) { return rm::softmax_of(x[0], x[1]); }, [](float* x) { return rm::softmax_of(x[0], x[1]); });
  check<2>("selection_key", A2, [](V* x) { return rm::selection_key(x[0], x[1]); }, [](float* x) { return rm::selection_key(x[0], x[1]); });
  check<2>("score_grad", A2, [](V* x) { return rm::score_grad(x[0], x[1]); }, [](float* x) { return rm::score_grad(x[0], x[1]); });
  check<2>("anchor_acc_coef", A2, [](V* x) { return rm::anchor_acc_coef(x[0], x[1]); }, [](float* x) { return rm::anchor_acc_coef(x[0], x[1]); });
  check<2>("rms_normalized", A2, [](V* x) { return rm::rms_normalized(x[0], x[1]); }, [](float* x) { return rm::rms_normalized(x[0], x[1]); });
  check<4>("rms_norm_input_grad", A4, [](V* x) { return rm::rms_norm_input_grad(x[0], x[1], x[2], x[3]); },
           [](float* x) { return rm::rms_norm_input_grad(x[0], x[1], x[2], x[3]); });
  check<3>("fmadd", A3, [](V* x) { return fmadd(x[0], x[1], x[2]); }, [](float* x) { return fmadd(x[0], x[1], x[2]); });
  check<2>("vmax", A2, [](V* x) { return vmax(x[0], x[1]); }, [](float* x) { return vmax(x[0], x[1]); });

#if LANES != 4  // (the array lanes have no 16-bit loads: the CUDA kernels convert x per element)
  // In-register conversions of 16-bit x and gradients.
  check<1>("bf16 store+load", A1,
           [](V* x) {
             l2r::bf16_t h[W];
             LaneIO<V>::store(h, x[0]);
             return LaneIO<V>::load(h);
           },
           [](float* x) { return bf16_to_float(float_to_bf16(x[0])); });
  check<1>("fp16 store+load", A1,
           [](V* x) {
             l2r::fp16_t h[W];
             LaneIO<V>::store(h, x[0]);
             return LaneIO<V>::load(h);
           },
           [](float* x) { return fp16_to_float(float_to_fp16(x[0])); });
  // Every 16-bit pattern loads to the same float.
  for (uint32_t base = 0; base < 65536; base += W) {
    l2r::bf16_t hb[W];
    l2r::fp16_t hf[W];
    for (int j = 0; j < W; ++j) hb[j].bits = hf[j].bits = static_cast<uint16_t>(base + j);
    float ob[W], of[W];
    LaneIO<V>::store(ob, LaneIO<V>::load(hb));
    LaneIO<V>::store(of, LaneIO<V>::load(hf));
    for (int j = 0; j < W; ++j) {
      checks += 2;
      const float in = float(base + j);
      if (!same(ob[j], bf16_to_float(hb[j]))) fail("bf16 load", j, &in, 1, ob[j], bf16_to_float(hb[j]));
      if (!same(of[j], fp16_to_float(hf[j]))) fail("fp16 load", j, &in, 1, of[j], fp16_to_float(hf[j]));
    }
  }
#endif
  std::printf("OK %ld\n", checks);
  return 0;
}
