// The tensor-core fragment check: one warp per 16 x 8 tile multiplies A (16 x K, bf16, row-major)
// by B (K x 8, bf16, stored column-major as Bt[8][K]) onto C through l2r::mma_m16n8k16_bf16 and
// csrc/common/mma_sync.cuh's fragment table. Built by the SIMT emulator (tests/simt/test_mma.py)
// and by nvcc on a GPU (tests/gpu/mma_fragments_main.cu, run by scripts/gpu_check.sh): the same
// kernel, the same expected D, so the emulator's layout is the hardware's when both pass.
#include <cuda_runtime.h>
#include <stdint.h>

#include "common/mma_sync.cuh"

namespace mma_fragments {

// Every warp of the block computes the same D = A Bt^T + C (K = 16 * steps) into its own 16 x 8
// slice of D (row-major), so a block of several warps checks that warps do not mix operands.
// `defect` (the emulator's tests only; 0 on a GPU) loads one fragment the wrong way, to show that
// the check catches a layout mistake: 1 swaps a[1] and a[2] (rows g + 8 and columns 2c + 8), 2 swaps
// the two bf16 halves of b[0].
__global__ void mma_tile_kernel(const uint16_t* __restrict__ A, const uint16_t* __restrict__ Bt,
                                const float* __restrict__ C, float* __restrict__ D, int steps, int defect) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int g = lane / 4, c = lane % 4, K = 16 * steps;
  float acc[4];
  for (int i = 0; i < 4; ++i) acc[i] = C[(g + 8 * (i / 2)) * 8 + 2 * c + i % 2];
  for (int s = 0; s < steps; ++s) {
    uint32_t a[4], b[2];
    for (int r = 0; r < 4; ++r) {
      const int row = g + 8 * (r % 2), col = 16 * s + 2 * c + 8 * (r / 2);
      a[r] = l2r::pack_bf16x2(A[row * K + col], A[row * K + col + 1]);
    }
    for (int r = 0; r < 2; ++r) {
      const int k = 16 * s + 2 * c + 8 * r;
      b[r] = l2r::pack_bf16x2(Bt[g * K + k], Bt[g * K + k + 1]);
    }
    if (defect == 1) {
      const uint32_t t = a[1];
      a[1] = a[2];
      a[2] = t;
    } else if (defect == 2) {
      b[0] = (b[0] >> 16) | (b[0] << 16);
    }
    l2r::mma_m16n8k16_bf16(acc, a, b, acc);
  }
  for (int i = 0; i < 4; ++i) D[warp * 128 + (g + 8 * (i / 2)) * 8 + 2 * c + i % 2] = acc[i];
}

}  // namespace mma_fragments

extern "C" int mma_fragments_launch(const uint16_t* A, const uint16_t* Bt, const float* C, float* D, int steps,
                                    int threads, int defect) {
  mma_fragments::mma_tile_kernel<<<1, threads>>>(A, Bt, C, D, steps, defect);
  return static_cast<int>(cudaGetLastError());
}
