// From expert logits to routing probabilities (docs/SPEC.md): p = softmax_e(l) or sigmoid(l), the
// z-loss statistic lse = logsumexp_e(l), and the balancing probability that mean_probs averages:
// p^ = p for softmax, p / sum_e p for sigmoid (Megatron-Core's normalisation for the aux loss).
// Max, sums and counts over experts are the backends' reductions; everything per expert is here.
#pragma once

#include "namespace.h"

L2R_ROUTE_MATH_BEGIN

// Softmax statistics over experts: the max logit (NaN if any is NaN) and sum_e exp(l_e - shift).
template <typename T>
struct SoftmaxStats {
  T max;
  T sum;
};

// exp(l - shift) is taken against the max, or 0 when every logit is -inf (no -inf - -inf).
template <typename T>
L2R_HD T softmax_shift(T max) {
  return max == -poly::kInf ? T(0) : max;
}

template <typename V>
L2R_HD V logit_exp(V logit, V shift) {
  return vexp(logit - shift);
}

template <typename T>
L2R_HD T stats_lse(SoftmaxStats<T> st) {
  return st.max + vlog(st.sum);
}

// p from the logit and its exp(l - shift) (softmax reuses the exp).
template <typename V>
L2R_HD V routing_prob(V logit, V logit_exp_shifted, V exp_sum, bool sigmoid) {
  return sigmoid ? V(1) / (V(1) + vexp(V(0) - logit)) : logit_exp_shifted / exp_sum;
}

// The softmax probability exp(l - lse) of the z-loss path (for sigmoid routing too).
template <typename V>
L2R_HD V softmax_of(V logit_exp_shifted, V exp_sum) {
  return logit_exp_shifted / exp_sum;
}

// p^ of one expert: p for softmax, p / prob_sum for sigmoid.
template <typename V>
L2R_HD V balance_prob(V p, V prob_sum, bool sigmoid) {
  return sigmoid ? p / prob_sum : p;
}

// mean_probs of a statistics group from its sum of p^ and its token count (0 without tokens).
template <typename T>
L2R_HD T mean_over_tokens(T sum, int64_t count) {
  return count > 0 ? sum * (T(1) / static_cast<T>(count)) : T(0);
}

L2R_ROUTE_MATH_END
