// Device copies of host vectors for the GPU check programs (tests/gpu/*_main.cu): allocated and
// filled on construction, freed on destruction, every CUDA call checked (a failed allocation or
// copy ends the program with the call's name: a check must never read a buffer that was not filled).
#pragma once

#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime.h>

inline void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) {
    std::printf("%s failed: %s\n", what, cudaGetErrorString(status));
    std::exit(2);
  }
}

template <typename T>
class DeviceBuffer {
 public:
  // A copy of `host` (its values: inputs, or the NaN fill that shows an output left unwritten).
  explicit DeviceBuffer(const std::vector<T>& host) : bytes_(host.size() * sizeof(T)) {
    check_cuda(cudaMalloc(&ptr_, bytes_), "cudaMalloc");
    check_cuda(cudaMemcpy(ptr_, host.data(), bytes_, cudaMemcpyHostToDevice), "cudaMemcpy to the device");
  }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  T* get() const { return ptr_; }
  // The device values back into `host` (the vector it was made from, or one of the same size).
  void copy_to(std::vector<T>& host) const {
    check_cuda(cudaMemcpy(host.data(), ptr_, bytes_, cudaMemcpyDeviceToHost), "cudaMemcpy to the host");
  }

 private:
  T* ptr_ = nullptr;
  size_t bytes_;
};
