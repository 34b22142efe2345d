// The CPU route kernels on 8-float AVX2 lanes. This whole translation unit is compiled for
// AVX2+FMA+F16C (the pragma comes before every include) and is called only on CPUs that have them
// (route_cpu.cpp checks); its inline code lives in its own ISA namespace (L2R_ISA, common/hd.h).
#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC target("avx2,fma,f16c")
#define L2R_ISA avx2

#include "../../common/lanes_avx2.h"
#include "route_cpu_kernel.h"

namespace l2r {
namespace route {
namespace cpu {

Kernels<float> avx2_kernels() { return make_kernels<lanes::Vec8f>("avx2"); }

}  // namespace cpu
}  // namespace route
}  // namespace l2r
#endif
