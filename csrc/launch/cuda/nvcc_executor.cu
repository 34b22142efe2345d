// The executor of the kernels nvcc compiled into this extension (CUDA builds): the device's limits
// from the CUDA runtime, and each plan run by the <<<>>> launches of its kernel source. Torch-free
// (streams come in as void*), like the kernels it launches.
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <string>
#include <utility>

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

  unsigned* stream_zero_words(int device, void* stream, int words) override {
    if (words <= 0 || words > kZeroWordsPerStream) return nullptr;
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
    if (cudaStreamIsCapturing(s, &capture) != cudaSuccess) {
      (void)cudaGetLastError();  // e.g. the legacy stream while another thread captures: no words
      return nullptr;
    }
    if (capture != cudaStreamCaptureStatusNone) return nullptr;
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto key = std::make_pair(device, stream);
    const auto found = zero_words_.find(key);
    if (found != zero_words_.end()) return found->second;
    // The caller's device guard has made `device` current. Once per stream (cudaMalloc may wait for
    // the device; every later call is this lookup). Kept for the life of the process (a stream
    // handle may be reused by a later stream: the words are zero between kernels anyway).
    void* words_ptr = nullptr;
    if (cudaMalloc(&words_ptr, sizeof(unsigned) * kZeroWordsPerStream) != cudaSuccess) {
      (void)cudaGetLastError();
      return nullptr;
    }
    if (cudaMemsetAsync(words_ptr, 0, sizeof(unsigned) * kZeroWordsPerStream, s) != cudaSuccess) {
      (void)cudaGetLastError();
      (void)cudaFree(words_ptr);
      return nullptr;
    }
    unsigned* ptr = static_cast<unsigned*>(words_ptr);
    zero_words_.emplace(key, ptr);
    return ptr;
  }

 private:
  // Enough for every kernel that takes such words (route_kernel_params.h kRouteCounterWords).
  static constexpr int kZeroWordsPerStream = 256;
  std::mutex mutex_;
  std::map<std::pair<int, void*>, unsigned*> zero_words_;
};

}  // namespace

PlanExecutor* nvcc_plan_executor() {
  static NvccExecutor executor;
  return &executor;
}

}  // namespace l2r
