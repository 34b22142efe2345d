// Memory access patterns with known GPU costs, for the counter tests in
// tests/simt/test_sanitizer.py: coalesced and strided global loads, 16-byte vector loads, and
// shared-memory accesses with a chosen bank-conflict degree. Written as ordinary CUDA.
#include <cuda_runtime.h>

namespace patterns {

// y[i] = x[i * stride]: stride 1 is coalesced (a warp's 128 bytes = 4 sectors), stride >= 8 puts
// every lane in its own sector (32 sectors per request).
__global__ void gather_kernel(const float* x, int stride, int n, float* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[static_cast<long>(i) * stride];
}

// 16-byte loads and stores: a warp moves 512 contiguous bytes (16 sectors) per request.
__global__ void vec4_kernel(const float4* x, int n, float4* y) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i];
}

// Lane l writes and then reads s[l * stride] (4-byte words): stride 1 or 33 is conflict-free,
// stride 2 is 2-way, stride 32 is 32-way; stride 0 is a broadcast (one word).
__global__ void bank_kernel(int stride, float* out) {
  __shared__ float s[32 * 33];
  const int lane = threadIdx.x;
  if (stride > 0 || lane == 0) s[lane * stride] = static_cast<float>(lane);
  __syncwarp();
  out[lane] = s[lane * stride];
}

// Lane l reads a float4 at s4[l * stride]: stride 1 is the ideal 4 wavefronts (8 lanes x 16
// bytes per phase), stride 2 doubles them.
__global__ void bank_vec4_kernel(int stride, float4* out) {
  __shared__ float4 s4[64];
  const int lane = threadIdx.x;
  s4[lane] = make_float4(1.f, 2.f, 3.f, 4.f);
  s4[lane + 32] = make_float4(5.f, 6.f, 7.f, 8.f);
  __syncwarp();
  out[lane] = s4[lane * stride];
}

// A butterfly sum of a float (5 shuffles of 4 bytes) and of a double (5 of 8 bytes: two
// instructions each on a GPU), one warp per block.
__global__ void shuffles_kernel(const float* x, float* out) {
  float v = x[threadIdx.x];
  double w = v;
  for (int o = 16; o > 0; o >>= 1) {
    v += __shfl_xor_sync(0xffffffffu, v, o);
    w += __shfl_xor_sync(0xffffffffu, w, o);
  }
  if (threadIdx.x == 0) out[blockIdx.x] = v + static_cast<float>(w);
}

}  // namespace patterns

extern "C" int pt_gather(const float* x, int stride, int n, float* y) {
  patterns::gather_kernel<<<(n + 31) / 32, 32>>>(x, stride, n, y);
  return static_cast<int>(cudaDeviceSynchronize());
}

extern "C" int pt_vec4(const float* x, int n, float* y) {
  patterns::vec4_kernel<<<(n + 31) / 32, 32>>>(reinterpret_cast<const float4*>(x), n,
                                                reinterpret_cast<float4*>(y));
  return static_cast<int>(cudaDeviceSynchronize());
}

extern "C" int pt_bank(int stride, float* out) {
  patterns::bank_kernel<<<1, 32>>>(stride, out);
  return static_cast<int>(cudaDeviceSynchronize());
}

extern "C" int pt_bank_vec4(int stride, float* out) {
  patterns::bank_vec4_kernel<<<1, 32>>>(stride, reinterpret_cast<float4*>(out));
  return static_cast<int>(cudaDeviceSynchronize());
}

extern "C" int pt_shuffles(const float* x, float* out, int blocks) {
  patterns::shuffles_kernel<<<blocks, 32>>>(x, out);
  return static_cast<int>(cudaDeviceSynchronize());
}

// A memset step followed by a kernel, as a launch plan runs them.
extern "C" int pt_memset_then_gather(float* buf, int n, float* y) {
  cudaMemsetAsync(buf, 0, static_cast<size_t>(n) * sizeof(float), nullptr);
  patterns::gather_kernel<<<(n + 31) / 32, 32>>>(buf, 1, n, y);
  return static_cast<int>(cudaDeviceSynchronize());
}
