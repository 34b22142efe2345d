// Compile-time switches over runtime values (after FlashAttention's static_switch.h): each case
// binds a constexpr or a type and runs the body; a value without a case runs ON_ERROR, which must
// leave the enclosing scope (return or throw): never a silent default.
//
//   L2R_BOOL_SWITCH(cond, kCond, { kernel<kCond>(...); });
//   L2R_RANK_SWITCH(rp, kRank, return Status::kUnsupportedRank, { launch<kRank, T>(...); });
//   L2R_FLOAT_DTYPE_SWITCH(dtype, scalar_t, return Status::kUnsupportedDType, { ... });
// The body is last (variadic) so that it may contain commas.
#pragma once

#define L2R_BOOL_SWITCH(COND, CONST_NAME, ...) \
  do {                                         \
    if (COND) {                                \
      constexpr bool CONST_NAME = true;        \
      __VA_ARGS__                              \
    } else {                                   \
      constexpr bool CONST_NAME = false;       \
      __VA_ARGS__                              \
    }                                          \
  } while (0)

// Ranks the templated route kernels are instantiated for (the padded rank, route_padded_rank);
// 0 is the generic kernel (any multiple of 8 above 32).
#define L2R_RANK_SWITCH(RP, CONST_NAME, ON_ERROR, ...)      \
  switch (RP) {                                             \
    case 1: { constexpr int CONST_NAME = 1; __VA_ARGS__ } break;   \
    case 2: { constexpr int CONST_NAME = 2; __VA_ARGS__ } break;   \
    case 4: { constexpr int CONST_NAME = 4; __VA_ARGS__ } break;   \
    case 8: { constexpr int CONST_NAME = 8; __VA_ARGS__ } break;   \
    case 16: { constexpr int CONST_NAME = 16; __VA_ARGS__ } break; \
    case 32: { constexpr int CONST_NAME = 32; __VA_ARGS__ } break; \
    case 0: { constexpr int CONST_NAME = 0; __VA_ARGS__ } break;   \
    default: ON_ERROR;                                      \
  }

// DType -> the device element type; only in code compiled by nvcc / NVRTC / the emulator (the
// caller includes cuda_fp16.h and cuda_bf16.h).
#define L2R_DTYPE_SWITCH(DTYPE, NAME, ON_ERROR, ...)                                   \
  switch (DTYPE) {                                                                     \
    case ::l2r::DType::kFloat32: { using NAME = float; __VA_ARGS__ } break;            \
    case ::l2r::DType::kFloat64: { using NAME = double; __VA_ARGS__ } break;           \
    case ::l2r::DType::kFloat16: { using NAME = __half; __VA_ARGS__ } break;           \
    case ::l2r::DType::kBFloat16: { using NAME = __nv_bfloat16; __VA_ARGS__ } break;   \
    default: ON_ERROR;                                                                 \
  }

// The 32- and 16-bit float types only (the CUDA route kernels compute in float32; float64 route
// inputs are a CPU/gradcheck path).
#define L2R_FLOAT_DTYPE_SWITCH(DTYPE, NAME, ON_ERROR, ...)                             \
  switch (DTYPE) {                                                                     \
    case ::l2r::DType::kFloat32: { using NAME = float; __VA_ARGS__ } break;            \
    case ::l2r::DType::kFloat16: { using NAME = __half; __VA_ARGS__ } break;           \
    case ::l2r::DType::kBFloat16: { using NAME = __nv_bfloat16; __VA_ARGS__ } break;   \
    default: ON_ERROR;                                                                 \
  }

// The 32- and 16-bit float types on the host (CPU kernels): l2r::bf16_t / l2r::fp16_t of
// common/half_bits.h (layout-compatible with c10::BFloat16 / c10::Half).
#define L2R_HOST_FLOAT_DTYPE_SWITCH(DTYPE, NAME, ON_ERROR, ...)                         \
  switch (DTYPE) {                                                                     \
    case ::l2r::DType::kFloat32: { using NAME = float; __VA_ARGS__ } break;            \
    case ::l2r::DType::kFloat16: { using NAME = ::l2r::fp16_t; __VA_ARGS__ } break;    \
    case ::l2r::DType::kBFloat16: { using NAME = ::l2r::bf16_t; __VA_ARGS__ } break;   \
    default: ON_ERROR;                                                                 \
  }
