// Launch plans: what a CUDA launcher does, as data. A planner (route/cuda/route_launch_plan.h,
// permute/cuda/permute_launch_plan.h) decides which kernel instantiations run, with which grid,
// block, dynamic shared memory and parameter struct, and which buffers are cleared first; an
// executor carries the plan out. Two executors share every plan: the nvcc-built kernels launched
// with <<<>>> (the .cu files' execute_*_plan, also run by the SIMT emulator), and the kernels
// compiled at run time with NVRTC and launched with cuLaunchKernel (l2r_cuda/jit). So the launch
// logic (shared-memory budgets, grids, workspace layout, instantiation choice) exists once.
//
// Host code only, framework-free. Every kernel takes one parameter struct by value (its bytes are
// what cuLaunchKernel passes), so those structs are POD with fixed-width fields.
#pragma once

#include <cstring>
#include <type_traits>

#include "dtype.h"

namespace l2r {

// The device properties a plan depends on (bytes of dynamic shared memory, multiprocessors).
struct DeviceLimits {
  int64_t smem_per_block_optin = 0;  // the most one block may opt in to
  int64_t smem_per_sm = 0;           // the SM's total
  int64_t sm_count = 0;              // multiprocessors (grids of persistent blocks, d splits)
};

// The .cu file a plan's kernels live in (l2r_cuda/jit compiles that file).
enum class KernelSource : int32_t { kRoute = 0, kPermute = 1 };
constexpr int kNumKernelSources = 2;

// One kernel instantiation of a source: its kernel (the source's own enum) and up to three
// template arguments (ranks, element types, modes: each source says what they mean).
struct KernelRef {
  int32_t kernel = 0;
  int32_t arg0 = 0;
  int32_t arg1 = 0;
  int32_t arg2 = 0;
};

enum class StepKind : int32_t { kKernel = 0, kMemset = 1 };

constexpr int kMaxPlanSteps = 12;
constexpr int kMaxParamsBytes = 384;
// Above this many bytes of dynamic shared memory a kernel must opt in (cudaFuncSetAttribute /
// cuFuncSetAttribute with the max dynamic shared memory attribute) before its launch.
constexpr int64_t kDefaultDynamicSmemBytes = 48 * 1024;

struct LaunchStep {
  StepKind kind = StepKind::kKernel;
  // kKernel
  KernelRef kernel;
  uint32_t grid[3] = {1, 1, 1};
  uint32_t block[3] = {1, 1, 1};
  int64_t smem_bytes = 0;
  int32_t params_bytes = 0;
  alignas(16) unsigned char params[kMaxParamsBytes];
  // kMemset: memset_bytes bytes at memset_dst set to memset_value (a byte)
  void* memset_dst = nullptr;
  int64_t memset_bytes = 0;
  int32_t memset_value = 0;

  template <typename P>
  const P& params_as() const {
    static_assert(sizeof(P) <= kMaxParamsBytes && alignof(P) <= 16, "parameter struct too large");
    return *reinterpret_cast<const P*>(params);
  }
};

struct LaunchPlan {
  KernelSource source = KernelSource::kRoute;
  Status status = Status::kOk;  // not kOk: nothing may run (the steps are incomplete)
  int32_t count = 0;
  LaunchStep steps[kMaxPlanSteps];

  explicit LaunchPlan(KernelSource s) : source(s) {}

  // A kernel launch with grid (gx, gy, gz) of `threads`-thread blocks.
  template <typename P>
  void kernel(KernelRef ref, uint32_t gx, uint32_t gy, uint32_t gz, uint32_t threads, int64_t smem,
              const P& params) {
    static_assert(std::is_trivially_copyable<P>::value, "kernel parameters must be POD");
    static_assert(sizeof(P) <= kMaxParamsBytes && alignof(P) <= 16, "parameter struct too large");
    LaunchStep* s = next();
    if (s == nullptr) return;
    s->kind = StepKind::kKernel;
    s->kernel = ref;
    s->grid[0] = gx;
    s->grid[1] = gy;
    s->grid[2] = gz;
    s->block[0] = threads;
    s->smem_bytes = smem;
    s->params_bytes = static_cast<int32_t>(sizeof(P));
    std::memcpy(s->params, &params, sizeof(P));
  }

  template <typename P>
  void kernel(KernelRef ref, int64_t blocks, uint32_t threads, int64_t smem, const P& params) {
    kernel(ref, static_cast<uint32_t>(blocks), 1, 1, threads, smem, params);
  }

  void memset(void* dst, int value, int64_t bytes) {
    LaunchStep* s = next();
    if (s == nullptr) return;
    s->kind = StepKind::kMemset;
    s->memset_dst = dst;
    s->memset_value = value;
    s->memset_bytes = bytes;
  }

  bool ok() const { return status == Status::kOk; }

 private:
  LaunchStep* next() {
    if (count == kMaxPlanSteps) {  // a planner bug: never launch half a plan
      status = Status::kPlanOverflow;
      return nullptr;
    }
    return &steps[count++];
  }
};

}  // namespace l2r
