// bf16 on the host for the GPU check programs (tests/gpu/*_main.cu).
#pragma once

#include <cstdint>
#include <cstring>

// The nearest bf16 to a finite float (ties to even), as its bits.
inline uint16_t host_bf16_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float host_bf16_value(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
