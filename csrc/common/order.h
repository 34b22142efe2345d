// The one total order of selection keys, shared by route's top-k and permute's capacity selection.
//
// (key, index) ranks before (key', index') when the key is larger, ties to the lower index; a NaN
// key ranks below every number (NaNs among themselves by index); -0 and +0 are equal. As one
// unsigned 64-bit number: (a, i) ranks before (b, j) exactly when order_key(a, i) > order_key(b, j),
// so "the k best" is "the k largest order keys", a well-defined set for any input.
#pragma once

#include "lanes.h"

namespace l2r {
L2R_ISA_BEGIN

L2R_HD uint64_t order_key(float key, uint32_t index) {
  uint32_t ordered = 0;  // NaN: below every number
  if (!(key != key)) {
    const uint32_t u = static_cast<uint32_t>(lanes::to_bits(key + 0.0f));  // -0 -> +0
    ordered = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // monotone: -inf -> 0x007fffff
  }
  return (static_cast<uint64_t>(ordered) << 32) | (0xffffffffu - index);
}

L2R_HD uint32_t order_key_index(uint64_t key) {
  return 0xffffffffu - static_cast<uint32_t>(key);
}

// The key an order key was made from (-0 comes back as +0, any NaN as the quiet NaN).
L2R_HD float order_key_value(uint64_t key) {
  const uint32_t ordered = static_cast<uint32_t>(key >> 32);
  if (ordered == 0) return lanes::from_bits(int32_t(0x7fc00000));
  const uint32_t u = (ordered & 0x80000000u) ? (ordered & 0x7fffffffu) : ~ordered;
  return lanes::from_bits(static_cast<int32_t>(u));
}

// The same order for float64 keys (the gradcheck path): 64 ordered key bits, then the index.
struct WideOrderKey {
  uint64_t ordered;
  uint32_t rev_index;
};
L2R_HD bool operator>(WideOrderKey a, WideOrderKey b) {
  return a.ordered != b.ordered ? a.ordered > b.ordered : a.rev_index > b.rev_index;
}
L2R_HD bool operator<=(WideOrderKey a, WideOrderKey b) { return !(a > b); }

L2R_HD WideOrderKey order_key(double key, uint32_t index) {
  uint64_t ordered = 0;  // NaN
  if (!(key != key)) {
    const double k = key + 0.0;  // -0 -> +0
    uint64_t u;
    L2R_MEMCPY(&u, &k, sizeof(u));
    ordered = (u >> 63) ? ~u : (u | (uint64_t(1) << 63));
  }
  return WideOrderKey{ordered, 0xffffffffu - index};
}

L2R_HD uint32_t order_key_index(WideOrderKey key) { return 0xffffffffu - key.rev_index; }

L2R_HD double order_key_value_wide(WideOrderKey key) {
  const uint64_t u = key.ordered == 0 ? uint64_t(0x7ff8000000000000ull)  // NaN
                     : (key.ordered >> 63) ? (key.ordered & ~(uint64_t(1) << 63)) : ~key.ordered;
  double v;
  L2R_MEMCPY(&v, &u, sizeof(v));
  return v;
}

// The order key type of a key type, its decoding, and the key below every order key (a candidate
// that must never be chosen: an expert outside the kept groups, an empty slot).
template <typename T>
struct OrderKeyOf;
template <>
struct OrderKeyOf<float> {
  using type = uint64_t;
  static L2R_HD float value(uint64_t k) { return order_key_value(k); }
};
template <>
struct OrderKeyOf<double> {
  using type = WideOrderKey;
  static L2R_HD double value(WideOrderKey k) { return order_key_value_wide(k); }
};

template <typename K>
L2R_HD K excluded_key() {
  return K{};
}

L2R_ISA_END
}  // namespace l2r
