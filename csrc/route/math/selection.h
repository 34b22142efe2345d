// Selection (docs/SPEC.md): the top-k experts of key = p + expert_bias in the total order of
// common/order.h (descending, ties to the lower index, NaN below numbers), optionally limited to
// the best groups (group-limited top-k, DeepSeek-V2/V3), and the weights of the selected experts.
// The search itself (SIMD scan, warp arg-max, ...) is the backends'; the rules are here.
#pragma once

#include "namespace.h"

#include "../../common/order.h"
#include "../route_options.h"

L2R_ROUTE_MATH_BEGIN

template <typename V>
L2R_HD V selection_key(V p, V bias) {
  return p + bias;
}

// Offers an order key to a descending list of `count` entries with room for k; returns the new
// count. O(k) per accepted offer; k is small (<= 32 in every model we know).
template <typename K>
L2R_HD int top_k_insert(K* top, int count, int k, K key) {
  int pos = count < k ? count : k;
  if (pos == k && key <= top[k - 1]) return count;
  if (pos == k) --pos;  // the last entry falls off
  while (pos > 0 && key > top[pos - 1]) {
    top[pos] = top[pos - 1];
    --pos;
  }
  top[pos] = key;
  return count < k ? count + 1 : k;
}

// Group-limited top-k. Experts [g * E/G, (g+1) * E/G) form group g. A group's score comes from its
// best two keys (best and second in the total order): their sum (top2_sum) or the best (max).
template <typename T>
L2R_HD T group_score(T best, T second, GroupScore policy) {
  return policy == GroupScore::kMax ? best : best + second;
}

// The two largest order keys of a group: offer every key, then group_score of their values.
template <typename K>
struct BestTwo {
  K best{};  // excluded_key<K>(): below every order key
  K second{};
  L2R_HD void offer(K key) {
    if (key > best) {
      second = best;
      best = key;
    } else if (key > second) {
      second = key;
    }
  }
};

// At most this many groups (a bit mask of the kept ones).
constexpr int kMaxGroups = 64;

// The kept groups as a bit mask: the topk_groups best (group score, group index) in the order of
// common/order.h. group_scores[g] for g < num_groups <= kMaxGroups.
template <typename T>
L2R_HD uint64_t kept_groups(const T* group_scores, int num_groups, int topk_groups) {
  using K = typename OrderKeyOf<T>::type;
  K top[kMaxGroups];
  int count = 0;
  for (int g = 0; g < num_groups; ++g) {
    count = top_k_insert(top, count, topk_groups, order_key(group_scores[g], static_cast<uint32_t>(g)));
  }
  uint64_t mask = 0;
  for (int j = 0; j < count; ++j) mask |= uint64_t(1) << order_key_index(top[j]);
  return mask;
}

L2R_HD int group_of(int expert, int experts, int num_groups) {
  return expert / (experts / num_groups);
}

L2R_HD bool in_kept_group(int expert, uint64_t kept_group_mask, int experts, int num_groups) {
  return num_groups <= 1 || ((kept_group_mask >> group_of(expert, experts, num_groups)) & 1u);
}

// Weight of a selected expert: p, renormalised over the selection when normalize, times the routed
// scaling factor.
template <typename T>
L2R_HD T selected_weight(T p, T selected_sum, bool normalize, T scaling) {
  return (normalize ? p / selected_sum : p) * scaling;
}

// An index read back from memory (route_backward's `indices`) addresses an expert only when in
// range; the adapters report anything else.
L2R_HD bool valid_expert(int64_t index, int experts) {
  return index >= 0 && index < experts;
}

L2R_ROUTE_MATH_END
