// The CPU route kernels on scalar lanes (one expert at a time): every CPU without AVX2, float64
// inputs (gradcheck), and L2R_CPU_ISA=portable. Compiled for the build's baseline target.
#include "route_cpu_kernel.h"

namespace l2r {
namespace route {
namespace cpu {

Kernels<float> portable_kernels_float() { return make_kernels<float>("portable"); }
Kernels<double> portable_kernels_double() { return make_kernels<double>("portable"); }

}  // namespace cpu
}  // namespace route
}  // namespace l2r
