// The one element-type enum of the framework-free kernel layer (CUDA launchers, SIMT emulator,
// NVRTC), and the status codes launchers return. The ATen adapters translate at::ScalarType and
// report a Status with status_message().
#pragma once

#include "hd.h"

namespace l2r {

enum class DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

enum class Status : int {
  kOk = 0,
  kUnsupportedDType,       // an element type the kernel has no instantiation for
  kUnsupportedRank,        // a rank the dispatch has no case for
  kSharedMemoryTooSmall,   // the per-warp scratch alone exceeds the device's shared memory
  kInvalidShape,           // sizes the kernel cannot index (caller bug: the adapters check first)
  kCudaError,              // a CUDA runtime call failed: see the accompanying cudaError_t
  kPlanOverflow,           // a launch plan needs more than kMaxPlanSteps steps (a planner bug)
};

L2R_HD const char* status_message(Status s) {
  switch (s) {
    case Status::kOk: return "ok";
    case Status::kUnsupportedDType: return "no kernel for this element type";
    case Status::kUnsupportedRank: return "no kernel for this rank";
    case Status::kSharedMemoryTooSmall:
      return "the per-warp scratch (about 3 E + k + 3 r floats per warp) exceeds this GPU's shared memory";
    case Status::kInvalidShape: return "sizes out of the kernel's index range";
    case Status::kCudaError: return "CUDA runtime error";
    case Status::kPlanOverflow: return "launch plan too long (a planner bug)";
  }
  return "unknown status";
}

}  // namespace l2r
