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

#include "loss_driver.h"
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

// The end of a group of rows, one row per lane (the lane and group paths): from each
// row's max m, target score x_y and weight w_y, s' and e_y (forward-only: s in s_excl
// and e_y = 0) and sum_j w_j d_j, the loss (with kDefer its part without the log, and
// the log's argument), and for the gradient the coefficients of e_j (a) and of w_j (b)
// and the target's entry gy.  Rows not `valid` (ignored or padding) contribute exact
// zeros; rows whose max is +inf or -inf come out NaN, like torch (NaN scores already
// made s NaN through vexp).
template <typename acc_t>
struct RowsTail {
  Vec<acc_t> loss, log_arg, a, b, gy, finite;
  bool clean;  // every row valid and finite: no masking pass needed
};
template <typename acc_t, bool kGrad, bool kDefer>
inline RowsTail<acc_t> rows_tail(const Vec<acc_t>& valid, const Vec<acc_t>& m, const Vec<acc_t>& x_y,
                                 const Vec<acc_t>& w_y, const Vec<acc_t>& s_excl, const Vec<acc_t>& e_y,
                                 const Vec<acc_t>& sum_wd, const CrossEntropyParams<acc_t>& p) {
  using V = Vec<acc_t>;
  const V zero(acc_t(0)), one(acc_t(1));
  const V nan(std::numeric_limits<acc_t>::quiet_NaN());
  RowsTail<acc_t> t;
  const V d_y = x_y - m;
  const V s = s_excl + e_y;
  t.finite = m.abs() < V(std::numeric_limits<acc_t>::infinity());
  if constexpr (kDefer) {
    // The loss without its log term; s - s keeps a NaN s (NaN scores) in the loss.
    t.loss = select(valid, select(t.finite, ce_loss(zero, d_y, w_y, sum_wd, p) + (s - s), nan), zero);
    t.log_arg = select(valid & t.finite, s, one);
  } else {
    const V log_s = vlog(s);  // s >= 1 (NaN rows are replaced below)
    t.loss = select(valid, select(t.finite, ce_loss(log_s, d_y, w_y, sum_wd, p), nan), zero);
  }
  t.clean = true;
  if constexpr (kGrad) {
    const V scale = select(valid, V(p.scale), zero);
    t.a = ce_exp_coef(w_y, scale, s, p);
    t.b = scale * V(p.smooth);
    t.gy = ce_target_grad(w_y, scale, s, s_excl, e_y, p);
    t.clean = (valid & t.finite).zero_mask() == 0;
  }
  return t;
}

struct CrossEntropyMath {
  template <typename acc_t>
  static bool ignored(int64_t y, const CrossEntropyParams<acc_t>& p) {
    return y == p.ignore_index;
  }

  // A row's gradient from its exponentials e_j in `work` (row() below): a e_j - b w_j,
  // and g_y in the target's column.
  template <typename acc_t>
  struct RowGradient {
    const acc_t* work;
    const acc_t* weight;
    Vec<acc_t> a, b;
    acc_t g_y;
    int64_t y;
    bool smoothing;
    // Inlined into the pass it is interleaved with: a call would spill its vectors.
    __attribute__((always_inline)) Vec<acc_t> operator()(int64_t j, int64_t n) const {
      Vec<acc_t> out = a * Vec<acc_t>::loadu(work + j, n);
      if (smoothing) out = out - b * Vec<acc_t>::loadu(weight + j, n);
      return (j <= y && y < j + n) ? with_lane(out, y - j, g_y) : out;
    }
  };
  // A streamed row's gradient not yet written (row_driver.h).
  template <typename acc_t>
  using PendingGradient = std::optional<StoreSpan<acc_t, RowGradient<acc_t>>>;

  // e_j goes to io.work and the gradient to io.g, so a caller streaming g to memory
  // keeps `work` in cache.  With `pending` (a streamed gradient, io.stream set), the row
  // first writes the pending gradient of the row before it, its stores spread through
  // this row's exponentials' pass, and leaves its own gradient there (its head vector
  // written), reading io.work until then: so the stores, which wait on memory, overlap
  // with the compute-bound pass instead of following it (bench/results/class-count-ab.md).
  template <typename acc_t, bool kGrad>
  static acc_t row(const RowIO<acc_t>& io, int64_t y, const CrossEntropyParams<acc_t>& p) {
    return row_impl<acc_t, kGrad, false>(io, y, p, nullptr);
  }
  template <typename acc_t, bool kGrad>
  static acc_t row(const RowIO<acc_t>& io, int64_t y, const CrossEntropyParams<acc_t>& p,
                   PendingGradient<acc_t>* pending) {
    return row_impl<acc_t, kGrad, true>(io, y, p, pending);
  }
  // kDefer: `pending` is set (and io.stream); else none of its code is compiled in.
  template <typename acc_t, bool kGrad, bool kDefer>
  static acc_t row_impl(const RowIO<acc_t>& io, int64_t y, const CrossEntropyParams<acc_t>& p,
                        PendingGradient<acc_t>* pending) {
    using V = Vec<acc_t>;
    const acc_t* x = io.x;
    acc_t* work = io.work;
    acc_t* g = io.g;
    LineStream<acc_t>* stream = io.stream;
    const int64_t C = p.classes;
    const bool smoothing = p.smooth != acc_t(0);
    if constexpr (!kGrad) {
      if (!smoothing && C >= Vec<acc_t>::size()) return row_loss_folded(io, y, p);
    }
    const acc_t m = max_of(x, C);
    // The row before's pending gradient, as a local: its fields stay in registers
    // through the pass below.
    PendingGradient<acc_t> before;
    if constexpr (kDefer) before.swap(*pending);
    if (!std::isfinite(m)) {  // a +inf score, or all -inf: NaN like torch (NaN scores reach s)
      if constexpr (kGrad) {
        if constexpr (kDefer)
          if (before) before->rest();
        store_map(g, 0, C, stream, [](int64_t, int64_t) { return V(std::numeric_limits<acc_t>::quiet_NaN()); });
      }
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
      // s' leaves the target's column out, so it keeps its relative precision.
      auto exp_pass = [&](auto&& between) __attribute__((always_inline)) {
        return smoothing ? exp_sum<true>(x, work, 0, C, m, p.weight, &sum_wd, io.next, y, nullptr, between)
                         : exp_sum(x, work, 0, C, m, nullptr, nullptr, io.next, y, nullptr, between);
      };
      acc_t s_excl;
      if constexpr (kDefer)
        interleaving(before, [&](auto&& between) __attribute__((always_inline)) { s_excl = exp_pass(between); });
      else
        s_excl = exp_pass(NothingBetween{});
      const acc_t e_y = sexp(d_y);
      const acc_t s = s_excl + e_y;
      const RowGradient<acc_t> gradient{work, p.weight, V(ce_exp_coef(w_y, p.scale, s, p)),
                                        V(p.scale * p.smooth),
                                        ce_target_grad(w_y, p.scale, s, s_excl, e_y, p), y, smoothing};
      work[y] = e_y;  // defined, though its lane is replaced by g_y
      if constexpr (kDefer) {
        pending->emplace(StoreSpan<acc_t, RowGradient<acc_t>>{g, 0, C, stream, gradient});
        (*pending)->head();
      } else {
        store_map(g, 0, C, stream, gradient);
      }
      return ce_loss(std::log(s), d_y, w_y, sum_wd, p);
    }
  }

  // row<kGrad = false> (evaluation) without a max pass of its own: the exps are taken
  // relative to a provisional shift m0 (the row's first vector's max) in the pass that
  // also finds the row's max m, and the sum is brought to the shift m by exp(m0 - m) once
  // per row; the target's term is taken at m, so a confident row's loss keeps the
  // two-pass precision.  One read of the row instead of two, which matters most once a
  // row outgrows L1 and its second read comes from L2.  Not used with a gradient: that
  // pass is bound by memory, not by the exps, and the fold did not pay there
  // (bench/results/class-count-ab.md has both measurements).
  // A shift more than this below the max is redone at the max: exp(m0 - m) stays a
  // normal number and every term stays far from overflow.
  static constexpr double kMaxShortfall = 30;

  template <typename acc_t>
  static acc_t row_loss_folded(const RowIO<acc_t>& io, int64_t y, const CrossEntropyParams<acc_t>& p) {
    const acc_t* x = io.x;
    const int64_t C = p.classes;
    acc_t m0 = hmax(Vec<acc_t>::loadu(x)), m;
    acc_t s_excl = exp_sum(x, nullptr, 0, C, m0, nullptr, nullptr, io.next, y, &m);
    if (!std::isfinite(m)) return std::numeric_limits<acc_t>::quiet_NaN();  // as row()
    if (!(m - m0 <= acc_t(kMaxShortfall))) {  // also a first vector of -inf (m0 = -inf)
      s_excl = exp_sum(x, nullptr, 0, C, m, nullptr, nullptr, nullptr, y);
      m0 = m;
    }
    const acc_t d_y = x[y] - m;
    const acc_t s = s_excl * sexp(m0 - m) + sexp(d_y);
    return ce_loss(std::log(s), d_y, p.weight[y], acc_t(0), p);
  }

  // Vec::size() rows of at least Vec::size() classes (GroupIO, row_driver.h): the row
  // path's passes over each row, with the work per row between them (the reductions,
  // the log, the divisions, the target's entries) done once for all the rows, one row
  // per lane, by rows_tail as in the lane path.
  // Below this the lane path is as fast or faster: a row of two or three vectors wastes
  // most of its last one (bench/results/class-count-ab.md).
  static constexpr int64_t kGroupMinClasses = 40;
  // ... on Intel CPUs; elsewhere the lanes are faster to 47 classes (group_min_classes,
  // row_driver.h).
  static constexpr bool kLaneClassesByCpu = true;
  // group_s reads each row's last full vector at C - W (the max pass): C >= W always.
  static_assert(kGroupMinClasses >= GroupIO<float>::kMaxRows);
  // Past this the row path is as fast: the per-row work is a small share of a long row.
  static constexpr int64_t kGroupMaxClasses = 512;
  static constexpr int64_t kGroupMaxClassesConverted = kGroupMaxClasses;
  static constexpr int64_t kGroupMaxClassesForwardOnly = kGroupMaxClasses;
  template <typename acc_t, bool kGrad>
  static void group(const GroupIO<acc_t>& io, Vec<acc_t>& loss, const CrossEntropyParams<acc_t>& p,
                    Vec<acc_t>* log_arg) {
    const bool smooth = p.smooth != acc_t(0);
    if constexpr (std::is_same_v<acc_t, float>) {
      if (log_arg)
        return smooth ? group_s<acc_t, kGrad, true, true>(io, loss, p, log_arg)
                      : group_s<acc_t, kGrad, false, true>(io, loss, p, log_arg);
    }
    return smooth ? group_s<acc_t, kGrad, true, false>(io, loss, p, log_arg)
                  : group_s<acc_t, kGrad, false, false>(io, loss, p, log_arg);
  }

  template <typename acc_t, bool kGrad, bool kSmooth, bool kDefer>
  static void group_s(const GroupIO<acc_t>& io, Vec<acc_t>& loss, const CrossEntropyParams<acc_t>& p,
                      Vec<acc_t>* log_arg) {
    using V = Vec<acc_t>;
    constexpr int W = V::size();
    const int64_t C = p.classes;
    const V zero(acc_t(0)), one(acc_t(1));
    alignas(64) acc_t lane[W], target[W], row_max[W];
    V part[W], part_wd[W];
    // Row maxima; the last vector may overlap the one before it (C >= W), which a max
    // allows.
    for (int r = 0; r < W; ++r) {
      const acc_t* x = io.x[r];
      V m0 = V::loadu(x + C - W), m1 = m0;
      int64_t j = 0;
      for (; j + 2 * W <= C; j += 2 * W) {
        m0 = fast_max(m0, V::loadu(x + j));
        m1 = fast_max(m1, V::loadu(x + j + W));
      }
      if (j + W <= C) m0 = fast_max(m0, V::loadu(x + j));
      part[r] = fast_max(m0, m1);
    }
    const V m = max_rows(part);
    m.store(row_max);
    // The targets' scores and weights, read before `work` (which may alias x) is written.
    for (int r = 0; r < W; ++r) {
      const int64_t y = io.y[r];
      target[r] = acc_t(y);
      lane[r] = y >= 0 ? io.x[r][y] : acc_t(0);
    }
    const V x_y = V::loadu(lane), vy = V::loadu(target), valid = vy >= zero;
    V w_y = select(valid, one, zero);
    if (p.has_weight) {
      for (int r = 0; r < W; ++r) lane[r] = io.y[r] >= 0 ? p.weight[io.y[r]] : acc_t(0);
      w_y = V::loadu(lane);
    }
    const V first = first_columns<acc_t>();
    // A row's last C % W columns, when they are at most half a vector, are taken for all
    // W rows at once, one row per lane as in the lane path: as the end of each row they
    // would cost a whole vector per row through both passes (C = 65: five vectors for 65
    // scores).  Longer tails gain nothing (bench/results/class-count-ab.md).
    constexpr int kMaxTail = W / 2;
    const int64_t tail = C % W <= kMaxTail ? C % W : 0, body = C - tail;
    // e_j = exp(x_j - m) to work, and s' (forward-only: s) with sum_j w_j d_j.
    for (int r = 0; r < W; ++r) {
      const acc_t* x = io.x[r];
      acc_t* e_out = io.work[r];
      const V vm(row_max[r]), yr(target[r]);
      V s = zero, wd = zero;
      row_chunks(body, io.next[r], first, [&](int64_t j, int64_t n, const V& columns) {
        const V d = V::loadu(x + j, n) - vm;
        const V e = vexp(d);
        if constexpr (kGrad) {
          e.store(e_out + j, n);
          s = add_except_target(s, e, n, columns, yr);
        } else {
          s = s + (n < W ? V::set(zero, e, n) : e);
        }
        if constexpr (kSmooth) wd = cpu::fmadd(V::loadu(p.weight + j, n), d, wd);
      });
      // row_chunks fetched the next group's row up to the body's end; its tail's line too.
      if (tail && io.next[r]) __builtin_prefetch(io.next[r] + C - 1, 0, 3);
      part[r] = s;
      part_wd[r] = wd;
    }
    V s_excl = sum_rows(part);
    V sum_wd = kSmooth ? sum_rows(part_wd) : zero;
    // The tail's e, a column per vector and a row per lane (padding rows read zeros),
    // kept in registers for the gradient pass: `work` (which may alias x) holds the body.
    V tail_e[kMaxTail > 0 ? kMaxTail : 1];
    for (int64_t k = 0; k < tail; ++k) {
      const int64_t j = body + k;
      for (int r = 0; r < W; ++r) lane[r] = io.x[r][j];
      const V d = V::loadu(lane) - m;
      const V e = vexp(d);
      s_excl = s_excl + (kGrad ? select_eq(vy, V(acc_t(j)), zero, e) : e);
      if constexpr (kSmooth) sum_wd = cpu::fmadd(V(p.weight[j]), d, sum_wd);
      tail_e[k] = e;
    }
    const V e_y = kGrad ? select(valid, vexp(x_y - m), zero) : zero;
    const RowsTail<acc_t> t = rows_tail<acc_t, kGrad, kDefer>(valid, m, x_y, w_y, s_excl, e_y, sum_wd, p);
    loss = t.loss;
    if constexpr (kDefer) *log_arg = t.log_arg;
    if constexpr (kGrad) {
      alignas(64) acc_t a[W], b[W], gy[W];
      t.a.store(a);
      t.b.store(b);
      t.gy.store(gy);
      const int constant = (valid & t.finite).zero_mask(), ignored = valid.zero_mask();
      // The tail's e to the rows' work, so each row's gradient is one pass in column
      // order (a streamed row's last vector joins the next row's first: LineStream).
      for (int64_t k = 0; k < tail; ++k) {
        tail_e[k].store(lane);
        for (int r = 0; r < W; ++r) io.work[r][body + k] = lane[r];
      }
      for (int r = 0; r < W; ++r) {
        acc_t* g = io.g[r];
        if (constant >> r & 1) {  // zeros (ignored or padding), else NaN (non-finite)
          const V fill((ignored >> r & 1) ? acc_t(0) : std::numeric_limits<acc_t>::quiet_NaN());
          store_map(g, 0, C, io.stream, [&](int64_t, int64_t) { return fill; });
          continue;
        }
        const acc_t* e = io.work[r];
        const int64_t y = io.y[r];
        const V va(a[r]), vb(b[r]);
        store_map(g, 0, C, io.stream, [&](int64_t j, int64_t n) {
          V out = va * V::loadu(e + j, n);
          if constexpr (kSmooth) out = out - vb * V::loadu(p.weight + j, n);
          return (j <= y && y < j + n) ? with_lane(out, y - j, gy[r]) : out;
        });
      }
    }
  }

  // Tiles per lanes() call.  Two independent tiles in flight: one tile's tail (the log,
  // the divisions and the gradient epilogue) is a long dependency chain that a single
  // tile of ~400 instructions cannot hide behind other work; with the two tiles'
  // chains interleaved the core overlaps them.
  static constexpr int kLaneTiles = 2;

  // U tiles of W rows (tile u at tile + u * C * W, targets vy[u]); the rows' losses go
  // to loss[u].  Ten classes (CIFAR-10 and digits, the workflow's case) get a
  // compile-time class count, so the class loops unroll (~12% less time at 65536 x 10
  // here); so do two and three without label smoothing, where the loops' overhead is
  // most of a class step (bench/results/class-count-ab.md).  kC = 0: any count, read
  // at run time.  Label smoothing is a template
  // argument too: as a run-time flag its test sat in every class step, and the rows'
  // weighted sums it needs held registers that the loops then spilled (~8% less time
  // at 65536 x 10 without smoothing, min of alternating runs on 1 and 2 threads).
  //
  // With `log_arg` (the driver's deferred logs, row_driver.h; float, no class weights,
  // summed losses), loss[u] leaves out log_weight * log s and log_arg[u] gets s: the
  // log's long dependency chain at the end of every tile was ~14% of a forward +
  // gradient at 65536 x 10 (single-thread microbenchmark, 1.17 -> 1.01 ns per score
  // without it).
  template <typename acc_t, bool kGrad, int U>
  static void lanes(acc_t* tile, const Vec<acc_t>* vy, Vec<acc_t>* loss,
                    const CrossEntropyParams<acc_t>& p, Vec<acc_t>* log_arg) {
    if constexpr (std::is_same_v<acc_t, float>) {
      if (log_arg) return lanes_s<acc_t, kGrad, U, true>(tile, vy, loss, p, log_arg);
    }
    lanes_s<acc_t, kGrad, U, false>(tile, vy, loss, p, log_arg);
  }

  static constexpr bool kDeferredLog = true;
  template <typename acc_t>
  static bool defers_log(const CrossEntropyParams<acc_t>& p) {
    return !p.has_weight;  // then every kept row's log s has the same weight
  }
  template <typename acc_t>
  static acc_t log_weight(const CrossEntropyParams<acc_t>& p) {
    return p.keep + p.smooth * p.weight_sum;  // (1 - eps) w_y + (eps / C) W, w_y = 1
  }

  template <typename acc_t, bool kGrad, int U, bool kDefer>
  static void lanes_s(acc_t* tile, const Vec<acc_t>* vy, Vec<acc_t>* loss,
                      const CrossEntropyParams<acc_t>& p, Vec<acc_t>* log_arg) {
    const bool smooth = p.smooth != acc_t(0);
    if (p.classes == 10)
      return smooth ? lanes_c<acc_t, kGrad, 10, U, true, kDefer>(tile, vy, loss, p, log_arg)
                    : lanes_c<acc_t, kGrad, 10, U, false, kDefer>(tile, vy, loss, p, log_arg);
    if (p.classes == 2 && !smooth) return lanes_c<acc_t, kGrad, 2, U, false, kDefer>(tile, vy, loss, p, log_arg);
    if (p.classes == 3 && !smooth) return lanes_c<acc_t, kGrad, 3, U, false, kDefer>(tile, vy, loss, p, log_arg);
    return smooth ? lanes_c<acc_t, kGrad, 0, U, true, kDefer>(tile, vy, loss, p, log_arg)
                  : lanes_c<acc_t, kGrad, 0, U, false, kDefer>(tile, vy, loss, p, log_arg);
  }

  template <typename acc_t, bool kGrad, int kC, int U, bool kSmooth, bool kDefer>
  static void lanes_c(acc_t* tile, const Vec<acc_t>* vy, Vec<acc_t>* loss,
                      const CrossEntropyParams<acc_t>& p, Vec<acc_t>* log_arg) {
    using V = Vec<acc_t>;
    constexpr int64_t W = V::size();
    const int64_t C = kC > 0 ? kC : p.classes;
    const V zero(acc_t(0)), one(acc_t(1));
    auto at = [&](int u, int64_t j) { return tile + (u * C + j) * W; };
    V valid[U], m[U], x_y[U], w_y[U], s_excl[U], e_y[U], sum_wd[U];
    for (int u = 0; u < U; ++u) {
      valid[u] = vy[u] >= zero;
      m[u] = V::loadu(at(u, 0));
      x_y[u] = zero;
      w_y[u] = select(valid[u], one, zero);
      s_excl[u] = e_y[u] = sum_wd[u] = zero;
    }
    // Row max, and each lane's target score and weight, picked out by class masks
    // (cheaper than per-lane scalar lookups, which stall store forwarding).
    V vj = zero;  // class index as a vector (no int->float per class)
    for (int64_t j = 0; j < C; ++j, vj = vj + one) {
      for (int u = 0; u < U; ++u) {
        const V x = V::loadu(at(u, j));
        m[u] = fast_max(m[u], x);
        x_y[u] = select_eq(vy[u], vj, x, x_y[u]);
      }
    }
    if (p.has_weight) {
      for (int u = 0; u < U; ++u) {
        w_y[u] = zero;
        for (int64_t j = 0; j < C; ++j) w_y[u] = select_eq(vy[u], V(acc_t(j)), V(p.weight[j]), w_y[u]);
      }
    }
    // Classes [j0, j1): e_j to the tile, and the sums.
    vj = zero;
    auto exp_pass = [&](int64_t j0, int64_t j1, V* s, V* wd) __attribute__((always_inline)) {
      for (int64_t j = j0; j < j1; ++j, vj = vj + one) {
        for (int u = 0; u < U; ++u) {
          const V d = V::loadu(at(u, j)) - m[u];
          const V e = vexp(d);
          if constexpr (kGrad) {
            s[u] = s[u] + select_eq(vy[u], vj, zero, e);
            e.store(at(u, j));
          } else {
            // The loss needs only s (held here in s_excl, with e_y = 0): no target masks,
            // ~12% less time forward-only.
            s[u] = s[u] + e;
          }
          if constexpr (kSmooth) wd[u] = cpu::fmadd(V(p.weight[j]), d, wd[u]);
        }
      }
    };
    if constexpr (kC == 2) {
      // Two classes: the max's own d is 0, whose exp is 1 exactly, and the other's is
      // d_0 + d_1 (the max's term adds 0): one exp per row where exp_pass takes two and
      // the target's e_y below a third, for the same bits as theirs, NaN and infinite
      // scores included (a NaN d reaches t and so every e).
      static_assert(!kSmooth, "two classes take this path without label smoothing only");
      for (int u = 0; u < U; ++u) {
        const V d0 = V::loadu(at(u, 0)) - m[u], d1 = V::loadu(at(u, 1)) - m[u];
        const V t = vexp(d0 + d1);
        const V e0 = select(d0 == zero, one, t), e1 = select(d1 == zero, one, t);
        if constexpr (kGrad) {
          const V target0 = vy[u] == zero;
          s_excl[u] = select(target0, zero, e0) + select(vy[u] == one, zero, e1);
          e_y[u] = select(valid[u], select(target0, e0, e1), zero);
          e0.store(at(u, 0));
          e1.store(at(u, 1));
        } else {
          s_excl[u] = e0 + e1;
        }
      }
    } else if constexpr (kC > 0) {
      exp_pass(0, C, s_excl, sum_wd);
    } else {
      for (int64_t j0 = 0; j0 < C; j0 += kLaneSumBlock) {  // see kLaneSumBlock
        V s[U], wd[U];
        for (int u = 0; u < U; ++u) s[u] = wd[u] = zero;
        exp_pass(j0, std::min<int64_t>(C, j0 + kLaneSumBlock), s, wd);
        for (int u = 0; u < U; ++u) {
          s_excl[u] = s_excl[u] + s[u];
          if constexpr (kSmooth) sum_wd[u] = sum_wd[u] + wd[u];
        }
      }
    }
    // The target's e_y, computed again from x_y (the same value the pass above made)
    // rather than picked out of every class's e with a mask.
    if constexpr (kGrad && kC != 2)
      for (int u = 0; u < U; ++u) e_y[u] = select(valid[u], vexp(x_y[u] - m[u]), zero);
    RowsTail<acc_t> tail[U];
    bool clean = true;
    for (int u = 0; u < U; ++u) {
      tail[u] = rows_tail<acc_t, kGrad, kDefer>(valid[u], m[u], x_y[u], w_y[u], s_excl[u], e_y[u],
                                                sum_wd[u], p);
      loss[u] = tail[u].loss;
      if constexpr (kDefer) log_arg[u] = tail[u].log_arg;
      clean = clean && tail[u].clean;
    }
    const V nan(std::numeric_limits<acc_t>::quiet_NaN());
    if constexpr (kGrad) {
      vj = zero;
      for (int64_t j = 0; j < C; ++j, vj = vj + one) {
        for (int u = 0; u < U; ++u) {
          V g = tail[u].a * V::loadu(at(u, j));
          if constexpr (kSmooth) g = g - tail[u].b * V(p.weight[j]);
          g = select_eq(vy[u], vj, tail[u].gy, g);
          if (!clean) g = select(valid[u], select(tail[u].finite, g, nan), zero);
          g.store(at(u, j));
        }
      }
    }
  }
};

// What a cross-entropy run needs besides the scores: the targets' plan, the class
// weights and the math's parameters, with the gradient scale of the reduction.
// Not copyable: `params.weight` points into `weight`.
template <typename scalar_t>
struct CrossEntropySetup {
  using acc_t = acc_type<scalar_t>;
  ClassWeights<scalar_t> weight;
  ScratchVector<acc_t> lane_targets;
  TargetPlan<acc_t> plan;
  double denom = 1;  // divides a 'mean'
  CrossEntropyParams<acc_t> params;

  // in_kernel: let the lane path (no class weights) read the targets itself; the fused
  // linear ops and the SGD step, which drive the tiles themselves, leave it false.
  // rows: the scores' layout, when the caller runs them through run_rows (which may
  // take the lane path for strided classes); else rows of C contiguous classes.
  CrossEntropySetup(const Tensor& target, const OptTensor& w, int64_t C,
                    int64_t ignore_index, double label_smoothing, int64_t reduction,
                    bool in_kernel = false, const RowGeometry* rows = nullptr)
      : weight(w, C) {
    const bool lanes = rows ? use_lanes<CrossEntropyMath>(*rows) : use_lanes<CrossEntropyMath>(C);
    const double weight_sum = weight.sum();
    plan.op = "cross_entropy";
    plan.index_error = true;
    double kept = double(target.numel());  // corrected after the pass if rows are ignored
    // A 'mean' in 16 bits counts the kept rows first: correcting its gradient after the
    // pass would round it twice.
    const bool count_first = reduction == kMean && !std::is_same_v<scalar_t, acc_t>;
    if (in_kernel && lanes && !w.has_value() && !count_first) {
      plan.rule = TargetRule{C, true, ignore_index};
      plan.mean_of_kept = true;
    } else {
      kept = checked_targets<acc_t>(plan.op, plan.index_error, target, C, lanes, true, ignore_index,
                                    w ? weight.data() : nullptr, lane_targets);
      plan.lane_targets = lane_targets.empty() ? nullptr : lane_targets.data();
    }
    denom = reduction == kMean ? kept : 1.0;
    // A 'mean' over rows whose target weights sum to zero (all of them 0, or every row
    // ignored) is NaN, as torch's: its NLL part is 0 / 0.  1 / 0 would turn the label
    // smoothing part, and the kept rows' gradient, into inf instead.
    if (denom == 0) denom = std::numeric_limits<double>::quiet_NaN();
    params = {weight.data(),
              w.has_value(),
              acc_t(weight_sum),
              acc_t(1.0 - label_smoothing),
              acc_t(C > 0 ? label_smoothing / double(C) : 0.0),
              acc_t(1.0 / denom),
              ignore_index,
              C};
  }
  CrossEntropySetup(const CrossEntropySetup&) = delete;
  CrossEntropySetup& operator=(const CrossEntropySetup&) = delete;
};

}  // namespace linclass::cpu
