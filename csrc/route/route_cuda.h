// Host launchers of the CUDA route kernels (route_cuda.cu). Raw pointers, sizes and a stream only:
// no torch headers, so the same declarations serve the ATen glue (route_ops_cuda.cpp) and the SIMT
// emulator tests (tests/test_route_cuda_emulated.py).
//
// Every float buffer is float32 and contiguous. `rank_padded` (route_padded_rank) is the rank the
// kernels compute with: proj/anchor rows are zero-padded to it, which changes no result.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace l2r {
namespace route {

// x's element type.
enum class XType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RouteCudaShape {
  int64_t tokens;  // T
  int64_t d;
  int rank;        // r
  int experts;     // E
  int anchors;     // H
  int top_k;       // k
};

struct RouteCudaOptions {
  float beta;
  float eps_norm;
  float eps;
  float tau;
  bool use_norm;   // norm="rms"
  bool sigmoid;    // score="sigmoid"
  bool normalize;
};

// Rank the kernels use: r rounded up to 1, 2, 4, 8, 16 or 32 (templated kernels), beyond 32 to a
// multiple of 8 (generic kernel).
int route_padded_rank(int rank);

// Scratch (in floats, 16-byte multiples) the launchers need; the caller allocates it (any
// contents) and passes it as `workspace`.
int64_t route_forward_workspace_floats(const RouteCudaShape& s);
int64_t route_backward_workspace_floats(const RouteCudaShape& s);

// Forward. proj [r, d], anchors [E, H, r], norm_weight [d] (nullptr: none), expert_bias [E]
// (nullptr: none), scale [1]: float32 device pointers. Outputs: weights [T, k], indices [T, k],
// tokens_per_expert [E], mean_probs [E], lse [T], q [T, r], rstd [T] (1 where use_norm is false).
// Returns cudaSuccess, cudaErrorInvalidValue when E * (experts' scratch) cannot fit in shared
// memory, or the launch error.
cudaError_t launch_route_forward(const void* x, XType x_type, const float* proj,
                                 const float* anchors, const float* norm_weight,
                                 const float* expert_bias, const float* scale,
                                 const RouteCudaShape& shape, const RouteCudaOptions& opt,
                                 float* weights, int64_t* indices, int64_t* tokens_per_expert,
                                 float* mean_probs, float* lse, float* q, float* rstd,
                                 float* workspace, cudaStream_t stream);

// Backward (recomputes from q and rstd). grad_weights [T, k], grad_mean_probs [E], grad_lse [T]:
// each nullptr when zero. Outputs: grad_x [T, d] in x's type, grad_proj [r, d],
// grad_anchors [E, H, r], grad_scale [1], grad_norm_weight [d] (written only when norm_weight is
// given and use_norm).
cudaError_t launch_route_backward(const float* grad_weights, const float* grad_mean_probs,
                                  const float* grad_lse, const void* x, XType x_type,
                                  const float* proj, const float* anchors,
                                  const float* norm_weight, const float* scale,
                                  const int64_t* indices, const float* q, const float* rstd,
                                  const RouteCudaShape& shape, const RouteCudaOptions& opt,
                                  void* grad_x, float* grad_proj, float* grad_anchors,
                                  float* grad_scale, float* grad_norm_weight, float* workspace,
                                  cudaStream_t stream);

}  // namespace route
}  // namespace l2r
