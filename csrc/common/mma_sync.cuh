// Warp-level tensor-core multiply-accumulate: one mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32,
// D (16 x 8, float) = A (16 x 16, bf16, row-major) * B (16 x 8, bf16, column-major) + C. Device code
// only (nvcc and NVRTC for sm_80 and newer, and the SIMT emulator, which runs the same collective in
// tests/simt); included by kernels that put a projection on tensor cores.
//
// Fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"): with
// g = lane / 4 and c = lane % 4, a 32-bit register holds two bf16 of consecutive k, the lower k in
// the lower half:
//   a[0]: A[g][2c..2c+1]     a[1]: A[g+8][2c..2c+1]     a[2]: A[g][2c+8..2c+9]   a[3]: A[g+8][2c+8..2c+9]
//   b[0]: B[2c..2c+1][g]     b[1]: B[2c+8..2c+9][g]
//   c[i], d[i]: row g + 8 * (i / 2), column 2c + i % 2.
// The emulator implements exactly this table, and tests/gpu/mma_fragments.cu checks the same kernel
// against the hardware (scripts/gpu_check.sh), so a kernel whose emulated results are right uses the
// layout the GPU has.
#pragma once

#include "hd.h"  // the fixed-width integers (also under NVRTC, which has no standard headers)

namespace l2r {

__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
#if defined(SIMT_EMULATION)
  __simt_mma_m16n8k16_bf16(d, a, b, c);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %11, %12, %13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#elif defined(__CUDA_ARCH__)
  // bf16 mma.sync needs sm_80; the package builds sm_80 and sm_90 only, so this is never compiled
  // into a kernel that runs.
  __trap();
#endif
}

// Two bf16 bit patterns in one 32-bit register, `lo` in the lower half (the lower k of a fragment).
__device__ __forceinline__ uint32_t pack_bf16x2(uint16_t lo, uint16_t hi) {
  return static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
}

}  // namespace l2r
