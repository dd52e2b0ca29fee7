// Fused multi-class hinge (torch's multi_margin_loss) for one row (or one SIMD group of
// rows): the loss and d loss / d scores from a single read of the scores.
//
// For scores x (C classes), target y, margin M, power p in {1, 2}, the target's class
// weight w_y (1 without `weight`) and the reduction's gradient scale `scale`
// (1/N for 'mean', else 1):
//
//   z_j   = M - x_y + x_j                                   (j != y)
//   loss  = (w_y / C) sum_{j != y} max(0, z_j)^p
//   dx_j  = scale (w_y / C) [z_j > 0] (p == 1 ? 1 : 2 z_j)   (j != y)
//   dx_y  = -sum_{j != y} dx_j
//
// The classic SVM loss (sum over wrong classes, margin 1) is this loss times C.
#pragma once

#include "loss_driver.h"
#include "row_driver.h"

namespace linclass::cpu {

template <typename acc_t>
struct MultiMarginParams {
  const acc_t* weight;  // C entries; ones when the caller gave no weight
  bool has_weight;      // false: every entry of `weight` is 1
  acc_t margin;
  acc_t scale;          // gradient scale of the reduction
  int64_t p;            // 1 or 2
  int64_t classes;
};

// Hinge term and its derivative for margin violations z: h = max(0, z)^p, d = dh/dz.
// Like torch, a term counts only where z > 0 (so a NaN term is dropped, not propagated).
// Always inlined: with a third caller (the group path) the baseline (SSE2) build stopped
// inlining it, and its row path then passed every vector through memory.
template <int P, typename V>
__attribute__((always_inline)) inline void hinge(const V& z, V& h, V& d) {
  using T = typename V::value_type;
  const V zero(T(0));
  const V zp = select_gt(z, zero, z, zero);
  if constexpr (P == 1) {
    h = zp;
    d = select_gt(z, zero, V(T(1)), zero);
  } else {
    h = zp * zp;
    d = zp + zp;
  }
}
// Over columns [begin, end) but `skip`: sum_h += sum h(c + x_j), sum_d += sum d(c + x_j);
// `next` (optional) is prefetched at the same offsets, and `between` runs, as in
// exp_sum.  One pass with the target's lane zeroed, and a masked vector for the last
// columns: summing the two ranges around the target, each with a scalar tail, cost up to
// 2 (W - 1) scalar steps per row.
template <int P, typename T, typename Between = NothingBetween>
inline void hinge_sums(const T* x, int64_t begin, int64_t end, T c, T& sum_h, T& sum_d,
                       const T* next, int64_t skip, Between&& between = {}) {
  constexpr int64_t W = Vec<T>::size();
  const Vec<T> vc(c), zero(T(0));
  Vec<T> sh = zero, sd = zero;
  for (int64_t j = begin; j < end; j += W) {
    if (next && (j - begin) % (2 * W) == 0) prefetch_pair(next + j, W);
    const int64_t n = std::min<int64_t>(W, end - j);
    Vec<T> h, d;
    hinge<P>(vc + Vec<T>::loadu(x + j, n), h, d);
    if (n < W) {  // the lanes past the row's end
      h = Vec<T>::set(zero, h, n);
      d = Vec<T>::set(zero, d, n);
    }
    if (skip >= j && skip < j + n) {
      h = with_lane(h, skip - j, T(0));
      d = with_lane(d, skip - j, T(0));
    }
    sh = sh + h;
    sd = sd + d;
    between(j - begin, n);  // as in exp_sum
  }
  sum_h += hsum(sh);
  sum_d += hsum(sd);
}

struct MultiMarginMath {
  template <typename acc_t>
  static bool ignored(int64_t, const MultiMarginParams<acc_t>&) {
    return false;
  }

  // A row's gradient, recomputed from its scores: coef * h'(c + x_j), g_y in the
  // target's column.
  template <int P, typename acc_t>
  __attribute__((always_inline)) static Vec<acc_t> gradient_at(const acc_t* x, const Vec<acc_t>& c,
                                                               const Vec<acc_t>& coef, acc_t g_y,
                                                               int64_t y, int64_t j, int64_t n) {
    Vec<acc_t> h, d;
    hinge<P>(c + Vec<acc_t>::loadu(x + j, n), h, d);
    const Vec<acc_t> out = coef * d;
    return (j <= y && y < j + n) ? with_lane(out, y - j, g_y) : out;
  }
  template <typename acc_t>
  struct RowGradient {
    const acc_t* x;
    Vec<acc_t> c, coef;
    acc_t g_y;
    int64_t y;
    bool squared;  // p = 2
    // Inlined into the pass it is interleaved with: a call would spill its vectors.
    __attribute__((always_inline)) Vec<acc_t> operator()(int64_t j, int64_t n) const {
      return squared ? gradient_at<2>(x, c, coef, g_y, y, j, n) : gradient_at<1>(x, c, coef, g_y, y, j, n);
    }
  };
  // A streamed row's gradient not yet written (row_driver.h).
  template <typename acc_t>
  using PendingGradient = std::optional<StoreSpan<acc_t, RowGradient<acc_t>>>;

  // io.work is unused: the gradient is a second, store-only pass over the row (x is in
  // cache by then), which lets it stream g and place the target's entry in order.  With
  // `pending` (a streamed gradient), that pass is the next row's: this row's first pass
  // stores the pending gradient of the row before it, as cross-entropy's rows do, so
  // the stores overlap with the reads (bench/results/class-count-ab.md).
  template <typename acc_t, bool kGrad>
  static acc_t row(const RowIO<acc_t>& io, int64_t y, const MultiMarginParams<acc_t>& p) {
    return p.p == 1 ? row_p<1, kGrad, false, acc_t>(io, y, p, nullptr)
                    : row_p<2, kGrad, false, acc_t>(io, y, p, nullptr);
  }
  template <typename acc_t, bool kGrad>
  static acc_t row(const RowIO<acc_t>& io, int64_t y, const MultiMarginParams<acc_t>& p,
                   PendingGradient<acc_t>* pending) {
    return p.p == 1 ? row_p<1, kGrad, true>(io, y, p, pending) : row_p<2, kGrad, true>(io, y, p, pending);
  }

  // One tile per call: the hinge's per-tile tail is short (no log, no division).
  static constexpr int kLaneTiles = 1;

  // Vec::size() rows (GroupIO, row_driver.h): the row path's two passes over each row
  // (the sums, then the gradient), with the per-row reductions and coefficients done
  // once for all the rows, one row per lane.  The sums add in the row path's order, so
  // a row's loss is bitwise the row path's.
  // Below this the lane path is as fast or faster: a row of two or three vectors wastes
  // most of its last one (bench/results/class-count-ab.md).
  static constexpr int64_t kGroupMinClasses = 40;
  static constexpr bool kLaneClassesByCpu = false;
  // Past this the row path is as fast in training, streamed or not: the hinge's passes
  // are light, and the row path prefetches each next row during its pass
  // (bench/results/class-count-ab.md).
  static constexpr int64_t kGroupMaxClasses = 160;
  // Rows converted into scratch (16-bit or strided scores): past this, a group's 16 rows
  // converted in and out cost more than the group saves.
  static constexpr int64_t kGroupMaxClassesConverted = 100;
  // Forward-only, a row is one light pass and its per-row tail (two horizontal sums, the
  // target's lookups) weighs more: the groups share it over their rows, up to where
  // the row path's prefetching of each next row reads longer rows from memory faster
  // (bench/results/class-count-ab.md).
  static constexpr int64_t kGroupMaxClassesForwardOnly = 256;
  template <typename acc_t, bool kGrad>
  static void group(const GroupIO<acc_t>& io, Vec<acc_t>& loss, const MultiMarginParams<acc_t>& p,
                    Vec<acc_t>* /*log_arg: always null*/) {
    loss = p.p == 1 ? group_p<1, kGrad>(io, p) : group_p<2, kGrad>(io, p);
  }
  static constexpr bool kDeferredLog = false;

  template <typename acc_t, bool kGrad, int U>
  static void lanes(acc_t* tile, const Vec<acc_t>* vy, Vec<acc_t>* loss,
                    const MultiMarginParams<acc_t>& p, Vec<acc_t>* /*log_arg: always null*/) {
    static_assert(U == 1);
    loss[0] = p.p == 1 ? lanes_p<1, kGrad>(tile, vy[0], p) : lanes_p<2, kGrad>(tile, vy[0], p);
  }

 private:
  // kDefer: `pending` is set (and io.stream); else none of its code is compiled in.
  template <int P, bool kGrad, bool kDefer, typename acc_t>
  static acc_t row_p(const RowIO<acc_t>& io, int64_t y, const MultiMarginParams<acc_t>& p,
                     PendingGradient<acc_t>* pending) {
    using V = Vec<acc_t>;
    const acc_t* x = io.x;
    const int64_t C = p.classes;
    const acc_t w_over_c = p.weight[y] / acc_t(C);
    const acc_t c = p.margin - x[y];
    acc_t sum_h = 0, sum_d = 0;
    // The target's term left out of the sums.
    if constexpr (kDefer) {
      PendingGradient<acc_t> before;  // a local: its fields stay in registers
      before.swap(*pending);
      interleaving(before, [&](auto&& between) __attribute__((always_inline)) {
        hinge_sums<P>(x, 0, C, c, sum_h, sum_d, io.next, y, between);
      });
    } else {
      hinge_sums<P>(x, 0, C, c, sum_h, sum_d, io.next, y);
    }
    if constexpr (kGrad) {
      const acc_t coef = p.scale * w_over_c;
      const V vc(c), vcoef(coef);
      const acc_t g_y = -coef * sum_d;
      if constexpr (kDefer) {
        pending->emplace(StoreSpan<acc_t, RowGradient<acc_t>>{
            io.g, 0, C, io.stream, RowGradient<acc_t>{x, vc, vcoef, g_y, y, P == 2}});
        (*pending)->head();
      } else {
        // Inlined: a streamed row off vector boundaries calls it at both of its edges as
        // well, and GCC then left it out of line, spilling the vectors at every call.
        store_map(io.g, 0, C, io.stream, [&](int64_t j, int64_t n) __attribute__((always_inline)) {
          return gradient_at<P>(x, vc, vcoef, g_y, y, j, n);
        });
      }
    }
    return w_over_c * sum_h;
  }

  template <int P, bool kGrad, typename acc_t>
  static Vec<acc_t> group_p(const GroupIO<acc_t>& io, const MultiMarginParams<acc_t>& p) {
    using V = Vec<acc_t>;
    constexpr int W = V::size();
    const int64_t C = p.classes;
    const V zero(acc_t(0));
    alignas(64) acc_t target[W], c_row[W], lane[W];
    // Per row: c = M - x_y, and w_y (0 for padding rows, whose loss and gradient are zero).
    for (int r = 0; r < W; ++r) {
      const int64_t y = io.y[r];
      target[r] = acc_t(y);
      c_row[r] = y >= 0 ? p.margin - io.x[r][y] : acc_t(0);
      lane[r] = y >= 0 ? p.weight[y] : acc_t(0);
    }
    const V w_over_c = V::loadu(lane) / V(acc_t(C));
    const V first = first_columns<acc_t>();
    // A row's last C % W columns, when they are at most half a vector, are summed for all
    // W rows at once, one row per lane, as in cross-entropy's groups: as the end of each
    // row's pass they would cost a whole vector per row (C = 65: five vectors for 65
    // scores); the gradient's pass still writes each row whole.  Only where training
    // takes the groups as well, whatever the rows: past that, groups sum in the row
    // path's order, so that evaluation's losses stay bitwise training's.
    constexpr int kMaxTail = W / 2;
    const int64_t tail = C % W <= kMaxTail && C <= kGroupMaxClassesConverted ? C % W : 0, body = C - tail;
    V part_h[W], part_d[W];
    for (int r = 0; r < W; ++r) {
      const acc_t* x = io.x[r];
      const V vc(c_row[r]), yr(target[r]);
      V sh = zero, sd = zero;
      row_chunks(body, io.next[r], first, [&](int64_t j, int64_t n, const V& columns) {
        V h, d;
        hinge<P>(vc + V::loadu(x + j, n), h, d);
        sh = add_except_target(sh, h, n, columns, yr);  // the target's term left out
        sd = add_except_target(sd, d, n, columns, yr);
      });
      // row_chunks fetched the next group's row up to the body's end; its tail's line too.
      if (tail && io.next[r]) __builtin_prefetch(io.next[r] + C - 1, 0, 3);
      part_h[r] = sh;
      part_d[r] = sd;
    }
    // The tail's terms, a row per lane, added to the rows' sums after their reductions.
    V tail_h = zero, tail_d = zero;
    if (tail) {
      const V vc = V::loadu(c_row), vy = V::loadu(target);
      for (int64_t j = body; j < C; ++j) {
        for (int r = 0; r < W; ++r) lane[r] = io.x[r][j];
        V h, d;
        hinge<P>(vc + V::loadu(lane), h, d);
        tail_h = tail_h + select_eq(vy, V(acc_t(j)), zero, h);  // the target's term left out
        tail_d = tail_d + select_eq(vy, V(acc_t(j)), zero, d);
      }
    }
    if constexpr (kGrad) {
      const V coef = V(p.scale) * w_over_c;
      alignas(64) acc_t coefs[W], g_y[W];
      coef.store(coefs);
      (zero - coef * (sum_rows(part_d) + tail_d)).store(g_y);
      for (int r = 0; r < W; ++r) {
        const acc_t* x = io.x[r];
        const int64_t y = io.y[r];
        const V vc(c_row[r]), vcoef(coefs[r]);
        // Inlined, as in row_p: the groups stream too, rows off vector boundaries included.
        store_map(io.g[r], 0, C, io.stream, [&](int64_t j, int64_t n) __attribute__((always_inline)) {
          return gradient_at<P>(x, vc, vcoef, g_y[r], y, j, n);
        });
      }
    }
    // Padding rows (x = 0, c = 0, w_y = 0) sum no terms: their loss is an exact 0.
    return w_over_c * (sum_rows(part_h) + tail_h);
  }

  template <int P, bool kGrad, typename acc_t>
  static Vec<acc_t> lanes_p(acc_t* tile, const Vec<acc_t>& vy, const MultiMarginParams<acc_t>& p) {
    using V = Vec<acc_t>;
    constexpr int64_t W = V::size();
    const int64_t C = p.classes;
    const V zero(acc_t(0)), one(acc_t(1));
    // Each lane's target score and weight, picked out by class masks; lanes without a
    // row keep w_y = 0, so their loss and gradient are zero.
    const V valid = vy >= zero;
    V x_y = zero, w_y = select(valid, one, zero);
    V vj = zero;  // class index as a vector (no int->float per class)
    for (int64_t j = 0; j < C; ++j, vj = vj + one) x_y = select_eq(vy, vj, V::loadu(tile + j * W), x_y);
    if (p.has_weight) {
      w_y = zero;
      for (int64_t j = 0; j < C; ++j) w_y = select_eq(vy, V(acc_t(j)), V(p.weight[j]), w_y);
    }
    const V c = V(p.margin) - x_y;
    const V w_over_c = w_y / V(acc_t(C));
    const V coef = V(p.scale) * w_over_c;
    V sum_h = zero, sum_d = zero;
    vj = zero;
    for (int64_t j0 = 0; j0 < C; j0 += kLaneSumBlock) {  // see kLaneSumBlock
      V block_h = zero, block_d = zero;
      for (int64_t j = j0, j1 = std::min<int64_t>(C, j0 + kLaneSumBlock); j < j1; ++j, vj = vj + one) {
        V h, d;
        hinge<P>(c + V::loadu(tile + j * W), h, d);
        block_h = block_h + select_ne(vy, vj, h, zero);
        d = select_ne(vy, vj, d, zero);
        block_d = block_d + d;
        if constexpr (kGrad) (coef * d).store(tile + j * W);
      }
      sum_h = sum_h + block_h;
      sum_d = sum_d + block_d;
    }
    if constexpr (kGrad) {
      const V gy = zero - coef * sum_d;
      vj = zero;
      for (int64_t j = 0; j < C; ++j, vj = vj + one)
        select_eq(vy, vj, gy, V::loadu(tile + j * W)).store(tile + j * W);
    }
    // Not w_over_c * sum_h alone: with an infinite margin a row-less lane is 0 * inf.
    return select(valid, w_over_c * sum_h, zero);
  }
};

// What a multi_margin_loss run needs besides the scores (as CrossEntropySetup).  Its
// 'mean' divides by the number of rows (class weights scale terms but not the
// denominator), so its lane path always reads the targets in the kernel.
template <typename scalar_t>
struct MultiMarginSetup {
  using acc_t = acc_type<scalar_t>;
  ClassWeights<scalar_t> weight;
  ScratchVector<acc_t> lane_targets;
  TargetPlan<acc_t> plan;
  double denom = 1;
  MultiMarginParams<acc_t> params;

  MultiMarginSetup(const Tensor& target, const OptTensor& w, int64_t C,
                   int64_t p, double margin, int64_t reduction, bool in_kernel = false,
                   const RowGeometry* rows = nullptr)
      : weight(w, C) {
    plan.op = "multi_margin_loss";
    const bool lanes = rows ? use_lanes<MultiMarginMath>(*rows) : use_lanes<MultiMarginMath>(C);
    if (in_kernel && lanes) {
      plan.rule = TargetRule{C, false, 0};
    } else {
      checked_targets<acc_t>(plan.op, plan.index_error, target, C, lanes, false, 0, nullptr, lane_targets);
      plan.lane_targets = lane_targets.empty() ? nullptr : lane_targets.data();
    }
    denom = reduction == kMean ? double(target.numel()) : 1.0;
    params = {weight.data(), w.has_value(), acc_t(margin), acc_t(1.0 / denom), p, C};
  }
  MultiMarginSetup(const MultiMarginSetup&) = delete;
  MultiMarginSetup& operator=(const MultiMarginSetup&) = delete;
};

}  // namespace linclass::cpu
