// The executor of the kernels nvcc compiled into this extension (CUDA builds): the device's limits
// from the CUDA runtime, and each plan run by the <<<>>> launches of its kernel source. Torch-free
// (streams come in as void*), like the kernels it launches.
#include <cuda_runtime.h>

#include <string>

#include "../../permute/cuda/permute_launch.h"
#include "../../route/cuda/route_cuda.h"
#include "../plan_executor.h"
#include "execute_plan.h"

namespace l2r {
namespace {

std::string cuda_failure(const char* what, cudaError_t err) {
  return std::string(what) + ": " + cudaGetErrorName(err) + " (" + cudaGetErrorString(err) + ")";
}

class NvccExecutor final : public PlanExecutor {
 public:
  const char* name() const override { return "nvcc"; }

  std::string limits(int device, DeviceLimits* out) override {
    const cudaError_t err = device_limits(device, out);
    return err == cudaSuccess ? std::string() : cuda_failure("reading the device's shared-memory limits", err);
  }

  std::string run(const LaunchPlan& plan, int, void* stream) override {
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    const cudaError_t err = plan.source == KernelSource::kRoute ? route::execute_route_plan(plan, s)
                                                                : permute::execute_permute_plan(plan, s);
    return err == cudaSuccess ? std::string() : cuda_failure("CUDA kernel launch failed", err);
  }
};

}  // namespace

PlanExecutor* nvcc_plan_executor() {
  static NvccExecutor executor;
  return &executor;
}

}  // namespace l2r
