// The row sums of the cross-entropy against class probabilities, shared by the
// one-process kernel (cpu/cross_entropy_probs.cpp, which has the math in its header) and
// the class-sharded phases (cpu/sharded.cpp): for a row x of C scores shifted by m,
// its target row t, class weights w and t'_j = keep t_j + spread,
//   s = sum_j exp(x_j - m),  T = sum_j w_j t'_j,  A = sum_j w_j t'_j (x_j - m).
#pragma once

#include "vec_util.h"

namespace linclass {
namespace cpu {

template <typename acc_t>
struct ProbsParams {
  int64_t classes;      // of the row (a shard's width in cpu/sharded.cpp)
  const acc_t* weight;  // nullptr: every class weighs 1
  acc_t keep;           // 1 - label_smoothing
  acc_t spread;         // label_smoothing / C, of the global C
  acc_t scale;          // of the gradient: 1 / rows for 'mean', else 1
};

// w_j t'_j for the lanes [j, j + n) (zero past n).
template <typename acc_t>
inline Vec<acc_t> weighted_target(const acc_t* t, int64_t j, int64_t n, const ProbsParams<acc_t>& p) {
  using V = Vec<acc_t>;
  V wt = fmadd(V::loadu(t + j, n), V(p.keep), V(p.spread));
  if (p.weight) return wt * V::loadu(p.weight + j, n);  // zero-filled past n
  return n < V::size() ? V::set(V(acc_t(0)), wt, n) : wt;
}

template <typename acc_t>
struct ProbsSums {
  acc_t s, total, a;  // s, T, A above
};

// One pass over the row: its sums for the shift m, the exponentials kept in `work`
// (C elements) when it is set.  A -inf score with t'_j = 0 makes A NaN (0 * -inf), as
// in torch.
template <typename acc_t>
inline ProbsSums<acc_t> probs_row_sums(const acc_t* x, const acc_t* t, acc_t m, acc_t* work,
                                       const ProbsParams<acc_t>& p) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t C = p.classes;
  const V vm(m), zero(acc_t(0));
  V s = zero, total = zero, a = zero;
  for (int64_t j = 0; j < C; j += W) {
    const int64_t n = std::min<int64_t>(W, C - j);
    const V d = V::loadu(x + j, n) - vm;
    const V e = n < W ? V::set(zero, vexp(d), n) : vexp(d);
    if (work) e.store(work + j, n);
    const V wt = weighted_target(t, j, n, p);
    s = s + e;
    total = total + wt;
    a = fmadd(wt, d, a);  // lanes past n: 0 * (-m), finite
  }
  return {hsum(s), hsum(total), hsum(a)};
}

}  // namespace cpu
}  // namespace linclass
