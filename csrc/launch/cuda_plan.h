// The ATen side of launch plans: what the CUDA ops' glue (route_ops_cuda.cpp, permute_cuda.cpp)
// needs to run a plan on a tensor's device, whichever executor serves CUDA tensors. Generic c10
// only (device guard, current stream through the device-guard interface), so the glue compiles and
// works in a CPU-only build too, where l2r_cuda.jit's NVRTC executor may serve CUDA tensors.
#pragma once

#include <c10/core/Device.h>

#include "../common/launch_plan.h"
#include "plan_executor.h"

namespace l2r {

// The executor serving CUDA tensors; raises (naming `op`) when there is none.
PlanExecutor& cuda_plan_executor(const char* op);

// The shared-memory limits of a CUDA device, from the executor.
DeviceLimits cuda_device_limits(PlanExecutor& executor, const c10::Device& device, const char* op);

// Words of `device` kept zero for the current stream by the executor (PlanExecutor::stream_zero_words),
// or null (while the stream is captured into a CUDA graph, or when the executor keeps none).
unsigned* cuda_stream_zero_words(PlanExecutor& executor, const c10::Device& device, int words);
// Enqueues plan (which must be ok()) on the current stream of `device`; raises what failed.
void run_cuda_plan(PlanExecutor& executor, const LaunchPlan& plan, const c10::Device& device, const char* op);

}  // namespace l2r
