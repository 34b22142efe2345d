// Runs tests/simt/kernels/mma_fragments.cu on the GPU: integer-valued operands (every sum exact in
// float, whatever the order of the additions) must give D exactly, random ones within 1e-5 of the
// double-precision product (relative to the sum of |products|). Exit status 0 when every check
// holds. Built and run by scripts/gpu_check.sh:
//   nvcc -std=c++17 -arch=sm_90 -Icsrc tests/gpu/mma_fragments_main.cu -o mma_fragments && ./mma_fragments
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../simt/kernels/mma_fragments.cu"
#include "bf16_host.h"
#include "device_buffer.h"

namespace {

// Returns the number of mismatching elements of D (all warps' slices).
int check(bool integers, int steps, int warps, unsigned seed) {
  const int K = 16 * steps;
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> small(-8, 8);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  auto value = [&]() { return integers ? static_cast<float>(small(gen)) : normal(gen); };
  std::vector<uint16_t> A(16 * K), Bt(8 * K);
  std::vector<float> C(128), D(128 * warps, NAN);
  for (auto& v : A) v = host_bf16_bits(value());
  for (auto& v : Bt) v = host_bf16_bits(value());
  for (auto& v : C) v = integers ? static_cast<float>(small(gen)) : normal(gen);
  const DeviceBuffer<uint16_t> dA(A), dB(Bt);
  const DeviceBuffer<float> dC(C), dD(D);
  const int launch = mma_fragments_launch(dA.get(), dB.get(), dC.get(), dD.get(), steps, 32 * warps, 0);
  const cudaError_t sync = cudaDeviceSynchronize();
  if (launch != 0 || sync != cudaSuccess) {
    std::printf("launch failed: %d / %s\n", launch, cudaGetErrorString(sync));
    return 1 << 20;
  }
  dD.copy_to(D);
  int bad = 0;
  for (int w = 0; w < warps; ++w) {
    for (int i = 0; i < 16; ++i) {
      for (int j = 0; j < 8; ++j) {
        double ref = C[i * 8 + j], mag = std::fabs(C[i * 8 + j]);
        for (int k = 0; k < K; ++k) {
          const double p = (double)host_bf16_value(A[i * K + k]) * host_bf16_value(Bt[j * K + k]);
          ref += p;
          mag += std::fabs(p);
        }
        const double got = D[w * 128 + i * 8 + j];
        const bool ok = integers ? got == ref : std::fabs(got - ref) <= 1e-5 * mag;
        if (!ok && bad++ < 5) std::printf("  warp %d D[%d][%d] = %.9g, expected %.9g\n", w, i, j, got, ref);
      }
    }
  }
  return bad;
}

}  // namespace

int main() {
  int failed = 0;
  const int cases[][3] = {{1, 1, 1}, {1, 4, 2}, {0, 1, 1}, {0, 8, 4}};  // integers, steps, warps
  for (const auto& cs : cases) {
    const int bad = check(cs[0] != 0, cs[1], cs[2], 1234u + cs[1]);
    std::printf("mma_fragments: %s operands, K = %d, %d warp(s): %s\n", cs[0] ? "integer" : "random", 16 * cs[1],
                cs[2], bad ? "MISMATCH" : "ok");
    failed += bad != 0;
  }
  return failed ? 1 : 0;
}
