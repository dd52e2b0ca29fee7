// Fused softmax cross-entropy for one row (or one SIMD group of rows): the loss and
// d loss / d scores from a single read of the scores.
//
// For scores x (C classes), target y, class weights w (all ones without `weight`),
// W = sum_j w_j, label smoothing eps and the reduction's gradient scale `scale`
// (1 / sum of target weights for 'mean', else 1):
//
//   m     = max_j x_j,  d_j = x_j - m,  e_j = exp(d_j),  s = sum_j e_j
//   loss  = (1 - eps) w_y (log s - d_y) + (eps / C) (W log s - sum_j w_j d_j)
//   dx_j  = scale * [ ((1 - eps) w_y + (eps / C) W) e_j / s - (eps / C) w_j ]         j != y
//   dx_y  = scale * [ -(1 - eps) w_y s' / s + (eps / C) (W e_y / s - w_y) ]
//
// where s' = sum_{j != y} e_j is summed separately, so that 1 - p_y = s' / s keeps its
// relative precision when the row is confident (p_y -> 1) instead of cancelling in
// p_y - 1, and the loss uses the shifted scores d_j (log_softmax_j = d_j - log s), so it
// stays exact when the scores are large.  This is torch's formula (log_softmax +
// nll_loss + label smoothing), term for term.
#pragma once

#include "row_driver.h"

namespace linclass::cpu {

template <typename acc_t>
struct CrossEntropyParams {
  const acc_t* weight;  // C entries; ones when the caller gave no weight
  bool has_weight;      // false: every entry of `weight` is 1
  acc_t weight_sum;     // W
  acc_t keep;           // 1 - eps
  acc_t smooth;         // eps / C
  acc_t scale;          // gradient scale of the reduction
  int64_t ignore_index;
  int64_t classes;
};

// The per-row formulas, written once for scalars (row path) and vectors (lane path).
template <typename V, typename acc_t>
inline V ce_loss(V log_s, V d_y, V w_y, V sum_wd, const CrossEntropyParams<acc_t>& p) {
  return V(p.keep) * w_y * (log_s - d_y) + V(p.smooth) * (V(p.weight_sum) * log_s - sum_wd);
}
// Coefficient of e_j in dx_j.
template <typename V, typename acc_t>
inline V ce_exp_coef(V w_y, V scale, V s, const CrossEntropyParams<acc_t>& p) {
  return scale * (V(p.keep) * w_y + V(p.smooth) * V(p.weight_sum)) / s;
}
template <typename V, typename acc_t>
inline V ce_target_grad(V w_y, V scale, V s, V s_excl, V e_y, const CrossEntropyParams<acc_t>& p) {
  return scale * (V(p.smooth) * (V(p.weight_sum) * e_y / s - w_y) - V(p.keep) * w_y * s_excl / s);
}

struct CrossEntropyMath {
  template <typename acc_t>
  static bool ignored(int64_t y, const CrossEntropyParams<acc_t>& p) {
    return y == p.ignore_index;
  }

  // e_j goes to io.work and the gradient to io.g, so a caller streaming g to memory
  // keeps `work` in cache.
  template <typename acc_t, bool kGrad>
  static acc_t row(const RowIO<acc_t>& io, int64_t y, const CrossEntropyParams<acc_t>& p) {
    using V = Vec<acc_t>;
    const acc_t* x = io.x;
    acc_t* work = io.work;
    acc_t* g = io.g;
    const bool stream = io.stream;
    const int64_t C = p.classes;
    const bool smoothing = p.smooth != acc_t(0);
    const acc_t m = max_of(x, C);
    if (!std::isfinite(m)) {  // a +inf score, or all -inf: NaN like torch (NaN scores reach s)
      if constexpr (kGrad)
        store_map(g, 0, C, stream, [](int64_t, int64_t) { return V(std::numeric_limits<acc_t>::quiet_NaN()); });
      return std::numeric_limits<acc_t>::quiet_NaN();
    }
    const acc_t d_y = x[y] - m;  // read before work (which may alias x) is written
    const acc_t w_y = p.weight[y];
    acc_t sum_wd = 0;
    if constexpr (!kGrad) {
      const acc_t s = smoothing ? exp_sum<true>(x, nullptr, 0, C, m, p.weight, &sum_wd, io.next)
                                : exp_sum(x, nullptr, 0, C, m, nullptr, nullptr, io.next);
      return ce_loss(std::log(s), d_y, w_y, sum_wd, p);
    } else {
      const acc_t s_excl =
          smoothing ? exp_sum<true>(x, work, 0, y, m, p.weight, &sum_wd, io.next) +
                          exp_sum<true>(x, work, y + 1, C, m, p.weight, &sum_wd, io.next)
                    : exp_sum(x, work, 0, y, m, nullptr, nullptr, io.next) +
                          exp_sum(x, work, y + 1, C, m, nullptr, nullptr, io.next);
      sum_wd += w_y * d_y;
      const acc_t e_y = sexp(d_y);
      const acc_t s = s_excl + e_y;
      const V a(ce_exp_coef(w_y, p.scale, s, p));
      const V b(p.scale * p.smooth);
      const acc_t g_y = ce_target_grad(w_y, p.scale, s, s_excl, e_y, p);
      work[y] = e_y;  // defined, though its lane is replaced by g_y
      store_map(g, 0, C, stream, [&](int64_t j, int64_t n) {
        V out = a * V::loadu(work + j, n);
        if (smoothing) out = out - b * V::loadu(p.weight + j, n);
        return (j <= y && y < j + n) ? with_lane(out, y - j, g_y) : out;
      });
      return ce_loss(std::log(s), d_y, w_y, sum_wd, p);
    }
  }

  // Ten classes (CIFAR-10 and digits, the workflow's case) get a compile-time class
  // count: the class loops unroll and the exps of different classes overlap (~12% less
  // time at 65536 x 10 here).  kC = 0: any count, read at run time.
  template <typename acc_t, bool kGrad>
  static Vec<acc_t> lanes(acc_t* tile, const Vec<acc_t>& vy, const CrossEntropyParams<acc_t>& p) {
    if (p.classes == 10) return lanes_c<acc_t, kGrad, 10>(tile, vy, p);
    return lanes_c<acc_t, kGrad, 0>(tile, vy, p);
  }

  template <typename acc_t, bool kGrad, int kC>
  static Vec<acc_t> lanes_c(acc_t* tile, const Vec<acc_t>& vy, const CrossEntropyParams<acc_t>& p) {
    using V = Vec<acc_t>;
    constexpr int64_t W = V::size();
    const int64_t C = kC > 0 ? kC : p.classes;
    const bool smoothing = p.smooth != acc_t(0);
    const V zero(acc_t(0)), one(acc_t(1));
    const V valid = vy >= zero;
    // Row max, and each lane's target score and weight, picked out by class masks
    // (cheaper than per-lane scalar lookups, which stall store forwarding).
    V m = V::loadu(tile), x_y = zero, w_y = select(valid, one, zero);
    V vj = zero;  // class index as a vector (no int->float per class)
    for (int64_t j = 0; j < C; ++j, vj = vj + one) {
      const V x = V::loadu(tile + j * W);
      const V is_y = vy == vj;
      m = fast_max(m, x);
      x_y = select(is_y, x, x_y);
    }
    if (p.has_weight) {
      w_y = zero;
      for (int64_t j = 0; j < C; ++j) w_y = select(vy == V(acc_t(j)), V(p.weight[j]), w_y);
    }
    V s_excl = zero, e_y = zero, sum_wd = zero;
    vj = zero;
    for (int64_t j = 0; j < C; ++j, vj = vj + one) {
      const V d = V::loadu(tile + j * W) - m;
      const V e = vexp(d);
      const V is_y = vy == vj;
      s_excl = s_excl + select(is_y, zero, e);
      e_y = select(is_y, e, e_y);
      if (smoothing) sum_wd = at::vec::fmadd(V(p.weight[j]), d, sum_wd);
      if constexpr (kGrad) e.store(tile + j * W);
    }
    const V d_y = x_y - m;
    const V s = s_excl + e_y;
    const V log_s = vlog(s);  // s >= 1 (NaN rows are replaced below)
    // Rows whose max is +inf or -inf come out NaN, like torch (NaN scores already made
    // s NaN through vexp).
    const V finite = m.abs() < V(std::numeric_limits<acc_t>::infinity());
    const V nan(std::numeric_limits<acc_t>::quiet_NaN());
    if constexpr (kGrad) {
      const V scale = select(valid, V(p.scale), zero);
      const V a = ce_exp_coef(w_y, scale, s, p);
      const V b = scale * V(p.smooth);
      const V gy = ce_target_grad(w_y, scale, s, s_excl, e_y, p);
      // Only tiles with an ignored, padding or non-finite row need the masking pass.
      const bool clean = (valid & finite).zero_mask() == 0;
      vj = zero;
      for (int64_t j = 0; j < C; ++j, vj = vj + one) {
        V g = a * V::loadu(tile + j * W);
        if (smoothing) g = g - b * V(p.weight[j]);
        g = select(vy == vj, gy, g);
        if (!clean) g = select(valid, select(finite, g, nan), zero);
        g.store(tile + j * W);
      }
    }
    return select(valid, select(finite, ce_loss(log_s, d_y, w_y, sum_wd, p), nan), zero);
  }
};

}  // namespace linclass::cpu
