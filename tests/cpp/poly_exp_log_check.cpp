// The AVX2 exp8 / log8 of route_cpu_avx2.h against the scalar exp_poly / log_poly of
// route_math.cuh that the GPU can use: bitwise equal over a sweep of 7 million float bit patterns
// (numbers of every size, denormals, zeros, infinities, NaNs). Not part of the build:
//   TI=$(python -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "include"))')
//   g++ -O2 -std=c++20 -Icsrc -I$TI -I$TI/torch/csrc/api/include tests/cpp/poly_exp_log_check.cpp -o /tmp/poly_check && /tmp/poly_check
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "route/route_cpu_avx2.h"
#include <cstdio>
#include <cmath>
#include <cstring>
using namespace l2r::route;
__attribute__((target("avx2,fma,f16c"))) int run() {
  long bad_e = 0, bad_l = 0, n = 0;
  float in[8], oe[8], ol[8];
  uint64_t u = 0;
  do {
    for (int j = 0; j < 8; ++j) { uint32_t b = (uint32_t)(u + j * 97); memcpy(&in[j], &b, 4); }
    _mm256_storeu_ps(oe, avx2::exp8(_mm256_loadu_ps(in)));
    _mm256_storeu_ps(ol, avx2::log8(_mm256_loadu_ps(in)));
    for (int j = 0; j < 8; ++j) {
      float se = exp_poly(in[j]), sl = log_poly(in[j]);
      if (memcmp(&se, &oe[j], 4) && !(se != se && oe[j] != oe[j])) { if (bad_e++ < 3) printf("exp %a: %a vs %a\n", in[j], se, oe[j]); }
      if (memcmp(&sl, &ol[j], 4) && !(sl != sl && ol[j] != ol[j])) { if (bad_l++ < 3) printf("log %a: %a vs %a\n", in[j], sl, ol[j]); }
      ++n;
    }
    u += 8 * 97 + 4099;
  } while (u < (1ull << 32));
  printf("checked %ld values: exp mismatches %ld, log mismatches %ld\n", n, bad_e, bad_l);
  return bad_e || bad_l;
}
int main() { return run(); }
