// The CPU route kernels on 16-float AVX-512 lanes. This whole translation unit is compiled for
// AVX-512 F/DQ/BW/VL (x86-64-v4; the pragma comes before every include) and is called only on CPUs
// that have them (route_cpu.cpp checks); its inline code lives in its own ISA namespace.
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma,f16c")
#define L2R_ISA avx512
// GCC 12 warns about its own _mm512_undefined_* / _mm256_undefined_* placeholders inside the
// intrinsics headers (as "maybe" or, once inlined into the side-by-side scoring, as certain).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "../../common/lanes_avx512.h"
#include "route_cpu_kernel.h"
#include "route_cpu_top_k_avx512.h"

namespace l2r {
namespace route {
namespace cpu {

Kernels<float> avx512_kernels() { return make_kernels<lanes::Vec16f>("avx512"); }

}  // namespace cpu
}  // namespace route
}  // namespace l2r
#endif
