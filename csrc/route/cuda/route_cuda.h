// Host launchers of the CUDA route kernels (route_cuda.cu). Raw pointers, the framework-free shape
// and options of route_options.h and a stream only: no torch headers, so the same declarations
// serve the ATen glue (route_ops_cuda.cpp) and the SIMT emulator tests (tests/simt).
//
// Every float buffer is float32 and contiguous. The launchers never synchronize with the host.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../../common/dtype.h"
#include "../route_options.h"

namespace l2r {
namespace route {

// What one launch computes: the fused router (x -> routing), the logits alone (route_logits), or
// the routing of given logits (route_select, the linear router's routing).
enum class RouteMode : int { kRoute = 0, kLogits = 1, kSelect = 2 };

struct RouteForwardBuffers {
  // inputs
  const void* x = nullptr;             // [T, d] (kRoute, kLogits)
  DType x_type = DType::kFloat32;
  const float* proj = nullptr;         // [r, d]
  const float* anchors = nullptr;      // [E, H, r]
  const float* norm_weight = nullptr;  // [d] or null
  const float* scale = nullptr;        // [1] (device: no host read, CUDA-graph safe)
  const float* logits_in = nullptr;    // [T, E] (kSelect)
  const float* expert_bias = nullptr;  // [E] or null
  const bool* padding = nullptr;       // [T] or null (true: out of the statistics)
  // outputs
  float* weights = nullptr;            // [T, k]
  int64_t* indices = nullptr;          // [T, k]
  int64_t* tokens_per_expert = nullptr;// [groups, E]
  float* mean_probs = nullptr;         // [groups, E]
  float* lse = nullptr;                // [T]
  float* q = nullptr;                  // [T, r]
  float* rstd = nullptr;               // [T]
  float* logits_out = nullptr;         // [T, E] (kLogits)
  float* workspace = nullptr;          // route_forward_workspace_floats()
};

struct RouteBackwardBuffers {
  const float* grad_weights = nullptr;     // [T, k] or null
  const float* grad_mean_probs = nullptr;  // [groups, E] already divided by each group's token
                                           // count (route_checks.h mean_grad_per_token), or null
  const float* grad_lse = nullptr;         // [T] or null
  const float* grad_logits = nullptr;      // [T, E] (kLogits: dL/dl given)
  const void* x = nullptr;
  DType x_type = DType::kFloat32;
  const float* proj = nullptr;
  const float* anchors = nullptr;
  const float* norm_weight = nullptr;
  const float* scale = nullptr;
  const float* logits_in = nullptr;        // kSelect
  const bool* padding = nullptr;
  const int64_t* indices = nullptr;        // [T, k]
  const float* q = nullptr;                // [T, r]
  const float* rstd = nullptr;             // [T]
  bool need_grad_x = true;
  bool need_param_grads = true;
  // outputs
  void* grad_x = nullptr;                  // [T, d] in x's type
  float* grad_proj = nullptr;              // [r, d]
  float* grad_anchors = nullptr;           // [E, H, r]
  float* grad_scale = nullptr;             // [1]
  float* grad_norm_weight = nullptr;       // [d] (when norm_weight and norm)
  float* grad_logits_out = nullptr;        // [T, E] (kSelect)
  int32_t* bad_index = nullptr;            // set to 1 when indices has a value outside [0, E)
  float* workspace = nullptr;              // route_backward_workspace_floats()
};

// Rank the kernels use: r rounded up to 1, 2, 4, 8, 16 or 32 (templated kernels), beyond 32 to a
// multiple of 8 (generic kernel). proj/anchor rows are zero-padded to it, which changes no result.
int route_padded_rank(int rank);

// Scratch (in floats) the launchers need; the caller allocates it (any contents).
int64_t route_forward_workspace_floats(RouteMode mode, const RouteShape& s);
int64_t route_backward_workspace_floats(RouteMode mode, const RouteShape& s);

// Status::kOk, or why not; *cuda_error holds the CUDA error of Status::kCudaError.
Status launch_route_forward(RouteMode mode, const RouteShape& shape, const RouteOptions& opt,
                            const RouteForwardBuffers& buf, cudaStream_t stream, cudaError_t* cuda_error);
Status launch_route_backward(RouteMode mode, const RouteShape& shape, const RouteOptions& opt,
                             const RouteBackwardBuffers& buf, cudaStream_t stream, cudaError_t* cuda_error);

}  // namespace route
}  // namespace l2r
