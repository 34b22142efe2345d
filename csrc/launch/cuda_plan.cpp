// Running launch plans on CUDA tensors' devices (cuda_plan.h).
#include "cuda_plan.h"

#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/util/Exception.h>

#include <string>

namespace l2r {

PlanExecutor& cuda_plan_executor(const char* op) {
  PlanExecutor* executor = plan_executor();
  TORCH_CHECK(executor != nullptr, "l2r_cuda.", op,
              ": no CUDA kernels in this build and l2r_cuda.jit is not serving CUDA tensors "
              "(l2r_cuda.jit.status() says why)");
  return *executor;
}

DeviceLimits cuda_device_limits(PlanExecutor& executor, const c10::Device& device, const char* op) {
  DeviceLimits limits;
  const std::string error = executor.limits(device.index(), &limits);
  TORCH_CHECK(error.empty(), "l2r_cuda.", op, " (", executor.name(), " kernels): ", error);
  return limits;
}

unsigned* cuda_stream_zero_words(PlanExecutor& executor, const c10::Device& device, int words) {
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  return executor.stream_zero_words(device.index(), stream.native_handle(), words);
}

void run_cuda_plan(PlanExecutor& executor, const LaunchPlan& plan, const c10::Device& device, const char* op) {
  TORCH_CHECK(plan.ok(), "l2r_cuda.", op, ": ", status_message(plan.status));
  if (plan.count == 0) return;
  const c10::Stream stream = c10::impl::getDeviceGuardImpl(device.type())->getStream(device);
  const std::string error = executor.run(plan, device.index(), stream.native_handle());
  TORCH_CHECK(error.empty(), "l2r_cuda.", op, " (", executor.name(), " kernels): ", error);
}

}  // namespace l2r
