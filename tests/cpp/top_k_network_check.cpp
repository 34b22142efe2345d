// The AVX-512 top-k network (csrc/route/cpu/route_cpu_top_k_avx512.h) chooses exactly the experts
// the generic search select_top_k chooses, in the same order, on random keys, many exact ties,
// NaN, +-0, +-inf and denormals, for every E up to 300 and k <= 8. Built and run by
// tests/test_lane_math.py; prints "OK <checks>" or the first mismatch.
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#define L2R_ISA avx512
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include "common/lanes_avx512.h"
#include "route/cpu/route_cpu_kernel.h"
#include "route/cpu/route_cpu_top_k_avx512.h"

#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

using namespace l2r;
using namespace l2r::route::cpu;

static float draw(std::mt19937& g, int mode) {
  switch (mode) {
    case 0: return std::uniform_real_distribution<float>(-1.0f, 1.0f)(g);
    case 1: return float(int(g() % 5)) * 0.25f - 0.5f;  // many exact ties
    case 2: {
      const float specials[] = {NAN, -0.0f, 0.0f, INFINITY, -INFINITY, 1.0f, -1.0f, 2.0f};
      return specials[g() % 8];
    }
    default: return std::uniform_real_distribution<float>(-1.0f, 1.0f)(g) * 1e-40f;  // denormals
  }
}

int main() {
  std::mt19937 g(7);
  long checks = 0;
  for (int it = 0; it < 100000; ++it) {
    const int E = 1 + int(g() % 300);
    const int k = 1 + int(g() % (E < 8 ? E : 8));
    const int E_pad = (E + 15) / 16 * 16;
    const int mode = int(g() % 4);
    std::vector<float> keys(E_pad, 7.0f);  // padding lanes hold values that must never be chosen
    for (int e = 0; e < E; ++e) keys[e] = draw(g, mode);
    std::vector<uint64_t> top(k);
    int64_t want[8], got[8];
    select_top_k<lanes::Vec16f>(keys.data(), E, k, top.data(), want);
    select_top_k_network(keys.data(), E, E_pad, k, got);
    for (int j = 0; j < k; ++j) {
      ++checks;
      if (want[j] != got[j]) {
        std::printf("MISMATCH E=%d k=%d mode=%d slot %d: search %ld, network %ld\n", E, k, mode, j, long(want[j]),
                    long(got[j]));
        return 1;
      }
    }
  }
  std::printf("OK %ld\n", checks);
  return 0;
}
