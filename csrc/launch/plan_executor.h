// Who carries out launch plans (common/launch_plan.h) for CUDA tensors: the kernels nvcc built into
// this extension (launch/cuda/nvcc_executor.cu, CUDA builds only), or l2r_cuda.jit's NVRTC-compiled
// kernels launched through cupy (launch/python_executor.cpp), which takes over when it is set. The
// ATen glue of every CUDA op asks plan_executor() and never knows which one it got.
//
// Framework-free: no torch, no CUDA headers (streams are passed as void*).
#pragma once

#include <string>

#include "../common/launch_plan.h"

namespace l2r {

class PlanExecutor {
 public:
  virtual ~PlanExecutor() = default;
  // "nvcc" or "nvrtc" (l2r_cuda.cuda_backend()).
  virtual const char* name() const = 0;
  // The limits of `device` into *out; "" or what failed.
  virtual std::string limits(int device, DeviceLimits* out) = 0;
  // Enqueues every step of `plan` on `stream` (a cudaStream_t of `device`) without waiting for
  // them; "" or what failed.
  virtual std::string run(const LaunchPlan& plan, int device, void* stream) = 0;

  // `words` 32-bit words of `device`'s memory, zero now in `stream`'s order, that the executor keeps
  // for this (device, stream) for the life of the process: for kernels that leave what they use of
  // them zero (route_kernel_params.h's persistent counters), so a plan needs no memset step before
  // them. Null (the plan then zeroes a workspace slice itself) when `stream` is being captured into
  // a CUDA graph (a graph must not depend on memory it did not allocate or zero), when the memory
  // cannot be had, or from executors that do not keep any. Thread-safe. Streams of one device run
  // such kernels in their own order, so two streams never share words.
  virtual unsigned* stream_zero_words(int device, void* stream, int words) {
    (void)device, (void)stream, (void)words;
    return nullptr;
  }
};

// The executor in use: the override when one is set, else the nvcc kernels of a CUDA build, else
// null (a CPU-only build without l2r_cuda.jit).
PlanExecutor* plan_executor();

// Sets (or, with null, clears) the override. Not thread-safe against running ops: set it before
// launching work.
void set_plan_executor_override(PlanExecutor* executor);

#if defined(L2R_WITH_CUDA)
// The executor of the kernels compiled by nvcc (launch/cuda/nvcc_executor.cu).
PlanExecutor* nvcc_plan_executor();
#endif

}  // namespace l2r
