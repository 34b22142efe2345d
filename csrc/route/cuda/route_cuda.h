// Host launchers of the CUDA route kernels (route_cuda.cu): the launch plan of route_launch_plan.h
// executed with <<<>>> on a stream. Raw pointers, the framework-free shape and options of
// route_options.h and a stream only: no torch headers, so the same declarations serve the nvcc
// executor (launch/cuda/nvcc_executor.cu) and the SIMT emulator tests (tests/simt).
//
// Every float buffer is float32 and contiguous. The launchers never synchronize with the host.
#pragma once

#include <cuda_runtime.h>

#include "route_launch_plan.h"

namespace l2r {
namespace route {

// Runs a plan of route_forward_launches / route_backward_launches (plan.ok()) on `stream`.
cudaError_t execute_route_plan(const LaunchPlan& plan, cudaStream_t stream);

// Plans for the current device and runs: Status::kOk, or why not; *cuda_error holds the CUDA error
// of Status::kCudaError.
Status launch_route_forward(RouteMode mode, const RouteShape& shape, const RouteOptions& opt,
                            const RouteForwardBuffers& buf, cudaStream_t stream, cudaError_t* cuda_error);
Status launch_route_backward(RouteMode mode, const RouteShape& shape, const RouteOptions& opt,
                             const RouteBackwardBuffers& buf, cudaStream_t stream, cudaError_t* cuda_error);

}  // namespace route
}  // namespace l2r
