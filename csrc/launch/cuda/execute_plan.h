// The nvcc executor's side of launch plans (common/launch_plan.h): running a plan's steps in order
// on a stream with the CUDA runtime, and the device limits a plan is made for. Each kernel source
// (route_cuda.cu, permute_kernels.cu) supplies the <<<>>> launch of its own kernels; the SIMT
// emulator runs the same code. Host code, no torch.
#pragma once

#include <cuda_runtime.h>

#include "../../common/launch_plan.h"

namespace l2r {

inline dim3 grid_of(const LaunchStep& s) { return dim3(s.grid[0], s.grid[1], s.grid[2]); }

inline dim3 block_of(const LaunchStep& s) { return dim3(s.block[0], s.block[1], s.block[2]); }

// Opts `kernel` in to the step's dynamic shared memory when it exceeds the default 48 KiB.
template <typename P>
cudaError_t allow_dynamic_smem(void (*kernel)(P), int64_t smem_bytes) {
  if (smem_bytes <= kDefaultDynamicSmemBytes) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_bytes));
}

// Runs the steps of `plan` (plan.ok(): the caller checked) in order; launch_kernel(step, stream)
// launches one kernel step and returns cudaGetLastError().
template <typename LaunchKernel>
cudaError_t execute_plan(const LaunchPlan& plan, cudaStream_t stream, LaunchKernel&& launch_kernel) {
  for (int i = 0; i < plan.count; ++i) {
    const LaunchStep& s = plan.steps[i];
    const cudaError_t err = s.kind == StepKind::kMemset
                                ? cudaMemsetAsync(s.memset_dst, s.memset_value, static_cast<size_t>(s.memset_bytes), stream)
                                : launch_kernel(s, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

// The shared-memory limits and multiprocessor count of `device`.
inline cudaError_t device_limits(int device, DeviceLimits* out) {
  int block = 0, sm = 0, sms = 0;
  cudaError_t err = cudaDeviceGetAttribute(&block, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sm, cudaDevAttrMaxSharedMemoryPerMultiprocessor, device);
  if (err != cudaSuccess) return err;
  err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  if (err != cudaSuccess) return err;
  out->smem_per_block_optin = block;
  out->smem_per_sm = sm;
  out->sm_count = sms;
  return cudaSuccess;
}

// The limits of the current device.
inline cudaError_t current_device_limits(DeviceLimits* out) {
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  return err != cudaSuccess ? err : device_limits(device, out);
}

}  // namespace l2r
