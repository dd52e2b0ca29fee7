// The per-shard phases of the class-sharded losses (linclass.distributed; the math and
// its derivation are in linclass/_sharded.py, which calls these for CPU tensors).
//
// Each rank holds the scores x (N, C_local) of classes [start, start + C_local).
//   _ce_shard_stats   cross-entropy phase 1: per row m, s, s', d, owner flag, u (6 x N)
//   _ce_shard_grad    cross-entropy phase 2: dx_j = a_i exp(x_j - shift_i) - b_i w_j, and the
//                     target's entry, from the merged row coefficients
//   _mm_shard_grad    multi-margin phase 2: given x_y, the row sums (loss part, gradient
//                     part) and dx_j for j != y
//   _ce_probs_shard_stats / _ce_probs_shard_grad   cross-entropy against this shard's
//                     columns t of class probabilities: per row m, s, T, A (4 x N); then
//                     dx_j = a_i exp(x_j - shift_i) - scale w_j t'_j
// Phase 2 reads the scores again instead of keeping phase 1's exponentials: one pass over
// x and one over dx (streamed), where keeping them would add a write and a read of N x C.
// float32 and float64 (the caller converts half types); rows in parallel; every row's
// arithmetic is independent of the thread count.  The ops are internal to
// linclass/_sharded.py (detached CPU tensors, no autograd, no other device); csrc/ops.cpp
// registers them with the others.
#include "cpu/ops.h"

#include "buffer_cache.h"
#include "cross_entropy_probs.h"
#include "loss_driver.h"
#include "vec_util.h"

#include <cmath>
#include <limits>

namespace linclass {
namespace {

using cpu::Vec;

// Rows per parallel task: about 32k scores, so small shards are not split into tasks
// that cost more to start than to run.
int64_t grain(int64_t classes) { return std::max<int64_t>(1, (int64_t(1) << 15) / std::max<int64_t>(classes, 1)); }

// Gradients larger than the caches go out with non-temporal stores.
bool stream_rows(int64_t rows, int64_t classes, int64_t elem) { return rows * classes * elem > (8 << 20); }

void check_shard(const Tensor& x, const Tensor& target, const char* op) {
  LINCLASS_CHECK(x.dim() == 2, op, ": scores must be (N, C_local)");
  LINCLASS_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Double, op,
              ": scores must be float32 or float64");
  LINCLASS_CHECK(target.dim() == 1 && target.size(0) == x.size(0) && target.scalar_type() == ScalarType::Long,
              op, ": target must be int64 (N,)");
}

// The local column of row i's target, or -1 when this shard does not hold it.
inline int64_t owned_column(int64_t y, int64_t start, int64_t width, int64_t ignore_index) {
  const int64_t local = y - start;
  return (y != ignore_index && local >= 0 && local < width) ? local : -1;
}

template <typename T>
void ce_stats_rows(const T* x, const int64_t* target, int64_t N, int64_t C, int64_t start,
                   int64_t ignore_index, const T* w, T* out) {
  linclass::parallel_for(0, N, grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T* row = x + i * C;
      const T* next = i + 1 < r1 ? row + C : nullptr;
      const int64_t col = owned_column(target[i], start, C, ignore_index);
      const T m = C ? cpu::max_of(row, C) : -std::numeric_limits<T>::infinity();
      const T shift = std::isfinite(m) ? m : T(0);
      T u = 0, s_excl = 0, d = 0, e_y = 0;
      // s' skips the target's column (two ranges), so it keeps its relative precision.
      auto sum = [&](int64_t b, int64_t e) {
        return w ? cpu::exp_sum<true>(row, nullptr, b, e, shift, w, &u, next)
                 : cpu::exp_sum(row, nullptr, b, e, shift, nullptr, nullptr, next);
      };
      if (col >= 0) {
        s_excl = sum(0, col) + sum(col + 1, C);
        d = row[col] - shift;
        e_y = std::exp(d);
        if (w) u += w[col] * d;
      } else if (C) {
        s_excl = sum(0, C);
      }
      out[i] = m;
      out[N + i] = s_excl + e_y;
      out[2 * N + i] = s_excl;
      out[3 * N + i] = d;
      out[4 * N + i] = col >= 0 ? T(1) : T(0);
      out[5 * N + i] = u;
    }
  });
}

template <typename T>
void ce_grad_rows(const T* x, const int64_t* target, int64_t N, int64_t C, int64_t start,
                  int64_t ignore_index, const T* w, const T* shift, const T* a, const T* b,
                  const T* target_grad, T* g) {
  const bool stream = stream_rows(N, C, sizeof(T));
  linclass::parallel_for(0, N, grain(C), [&](int64_t r0, int64_t r1) {
    cpu::LineStream<T> line_stream;  // rows follow each other: their edges join
    cpu::LineStream<T>* const sink = stream ? &line_stream : nullptr;
    for (int64_t i = r0; i < r1; ++i) {
      const T* row = x + i * C;
      T* out = g + i * C;
      // An ignored row (NaN coefficients are not 0), written as zeros even where a +inf
      // score would make inf * 0.  Not a row whose only non-zero is its target column:
      // a = 0 there when this shard's exponentials underflow against the global max.
      if (a[i] == T(0) && b[i] == T(0) && target_grad[i] == T(0)) {
        cpu::store_map(out, 0, C, sink, [](int64_t, int64_t) { return Vec<T>(T(0)); });
        continue;
      }
      const Vec<T> vs(shift[i]), va(a[i]), vb(b[i]);
      const int64_t col = owned_column(target[i], start, C, ignore_index);
      cpu::store_map(out, 0, C, sink, [&](int64_t j, int64_t n) {
        const Vec<T> e = cpu::vexp(Vec<T>::loadu(row + j, n) - vs) * va;
        const Vec<T> dx = w ? e - vb * Vec<T>::loadu(w + j, n) : e - vb;
        return col >= j && col < j + n ? cpu::with_lane(dx, col - j, target_grad[i]) : dx;
      });
    }
    if (stream) line_stream.finish();
  });
}

template <typename T>
void mm_grad_rows(const T* x, const int64_t* target, int64_t N, int64_t C, int64_t start,
                  const T* x_y, const T* v, int64_t p, T margin, T* stats, T* g) {
  const bool stream = g && stream_rows(N, C, sizeof(T));
  constexpr int64_t W = Vec<T>::size();
  linclass::parallel_for(0, N, grain(C), [&](int64_t r0, int64_t r1) {
    cpu::LineStream<T> line_stream;  // rows follow each other: their edges join
    cpu::LineStream<T>* const sink = stream ? &line_stream : nullptr;
    for (int64_t i = r0; i < r1; ++i) {
      const T* row = x + i * C;
      const int64_t col = owned_column(target[i], start, C, std::numeric_limits<int64_t>::min());
      const Vec<T> base(margin - x_y[i]), vv(v[i]), zero(T(0)), two(T(2));
      Vec<T> loss0 = zero, grad0 = zero;
      // h_j = margin - x_y + x_j; the target's own column gets h = -inf: no term.
      auto term = [&](int64_t j, int64_t n) {
        Vec<T> h = base + Vec<T>::loadu(row + j, n);
        if (col >= j && col < j + n) h = cpu::with_lane(h, col - j, -std::numeric_limits<T>::infinity());
        const Vec<T> pos = Vec<T>::set(zero, cpu::clamp_min(h, zero), n);
        const Vec<T> gj = p == 1 ? cpu::select(h > zero, vv, zero) : two * vv * pos;
        loss0 = loss0 + (p == 1 ? pos : pos * pos);
        const Vec<T> gm = Vec<T>::set(zero, gj, n);
        grad0 = grad0 + gm;
        return gm;
      };
      if (g) {
        cpu::store_map(g + i * C, 0, C, sink, term);
      } else {
        for (int64_t j = 0; j < C; j += W) term(j, std::min<int64_t>(W, C - j));
      }
      const T loss = cpu::hsum(loss0), grad = cpu::hsum(grad0);
      stats[i] = loss;
      stats[N + i] = grad;
    }
    if (stream) line_stream.finish();
  });
}

template <typename T>
void ce_probs_stats_rows(const T* x, const T* t, int64_t N, const cpu::ProbsParams<T>& p, T* out) {
  const int64_t C = p.classes;
  linclass::parallel_for(0, N, grain(C), [&](int64_t r0, int64_t r1) {
    for (int64_t i = r0; i < r1; ++i) {
      const T m = C ? cpu::max_of(x + i * C, C) : -std::numeric_limits<T>::infinity();
      // As ce_stats_rows: no finite max, a shift of 0 (the merge makes such rows NaN
      // where the global max is not finite either).
      const cpu::ProbsSums<T> sums = cpu::probs_row_sums<T>(x + i * C, t + i * C,
                                                         std::isfinite(m) ? m : T(0), nullptr, p);
      out[i] = m;
      out[N + i] = sums.s;
      out[2 * N + i] = sums.total;
      out[3 * N + i] = sums.a;
    }
  });
}

template <typename T>
void ce_probs_grad_rows(const T* x, const T* t, int64_t N, const cpu::ProbsParams<T>& p,
                        const T* shift, const T* a, T* g) {
  const int64_t C = p.classes;
  const bool stream = stream_rows(N, C, sizeof(T));
  linclass::parallel_for(0, N, grain(C), [&](int64_t r0, int64_t r1) {
    cpu::LineStream<T> line_stream;
    cpu::LineStream<T>* const sink = stream ? &line_stream : nullptr;
    const Vec<T> scale(p.scale);
    for (int64_t i = r0; i < r1; ++i) {
      const T* row = x + i * C;
      const T* trow = t + i * C;
      const Vec<T> vs(shift[i]), va(a[i]);
      cpu::store_map(g + i * C, 0, C, sink, [&](int64_t j, int64_t n) {
        return cpu::vexp(Vec<T>::loadu(row + j, n) - vs) * va -
               scale * cpu::weighted_target(trow, j, n, p);
      });
    }
    if (stream) line_stream.finish();
  });
}

void check_probs_shard(const Tensor& x, const Tensor& target, const char* op) {
  LINCLASS_CHECK(x.dim() == 2, op, ": scores must be (N, C_local)");
  LINCLASS_CHECK(x.scalar_type() == ScalarType::Float || x.scalar_type() == ScalarType::Double, op,
                 ": scores must be float32 or float64");
  LINCLASS_CHECK(target.sizes() == x.sizes() && target.scalar_type() == x.scalar_type(), op,
                 ": target probabilities must be shaped and typed as the scores");
}

// The weights of this shard's classes in the scores' dtype, and ProbsParams over them.
template <typename T>
cpu::ProbsParams<T> probs_params(const Tensor& x, const Tensor& w, double label_smoothing,
                                 int64_t classes, double scale) {
  LINCLASS_CHECK(classes > 0, "class-sharded cross-entropy: the global class count must be > 0");
  return {x.size(1), w.defined() ? w.const_data_ptr<T>() : nullptr, T(1.0 - label_smoothing),
          T(label_smoothing / double(classes)), T(scale)};
}

Tensor shard_weight(const OptTensor& weight, const Tensor& x, const char* op) {
  if (!weight) return Tensor();
  LINCLASS_CHECK(weight->dim() == 1 && weight->size(0) == x.size(1), op,
                 ": weight must hold this shard's C_local class weights");
  return as_contiguous(to_dtype(*weight, x.scalar_type()));
}

}  // namespace

Tensor ce_shard_stats_cpu(const Tensor& x_, const Tensor& target_, int64_t start,
                          const OptTensor& weight, bool smoothing,
                          int64_t ignore_index) {
  check_shard(x_, target_, "_ce_shard_stats");
  const Tensor x = as_contiguous(x_), target = as_contiguous(target_);
  const int64_t N = x.size(0), C = x.size(1);
  Tensor out = empty({6, N}, x);
  Tensor w;
  if (smoothing && weight) w = as_contiguous(to_dtype(*weight, x.scalar_type()));
  LINCLASS_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), "_ce_shard_stats", [&] {
    const scalar_t* wp = !smoothing ? nullptr
                         : weight  ? w.const_data_ptr<scalar_t>()
                                   : cpu::shared_ones<scalar_t>(C);
    ce_stats_rows<scalar_t>(x.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), N, C,
                            start, ignore_index, wp, out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

Tensor ce_shard_grad_cpu(const Tensor& x_, const Tensor& target_, int64_t start,
                         const OptTensor& weight, const Tensor& shift,
                         const Tensor& exp_coef, const Tensor& weight_coef,
                         const Tensor& target_grad, int64_t ignore_index,
                         const OptTensor& out) {
  check_shard(x_, target_, "_ce_shard_grad");
  const Tensor x = as_contiguous(x_), target = as_contiguous(target_);
  const int64_t N = x.size(0), C = x.size(1);
  for (const Tensor* t : {&shift, &exp_coef, &weight_coef, &target_grad})
    LINCLASS_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == x.scalar_type() &&
                    t->is_contiguous(),
                "_ce_shard_grad: row coefficients must be contiguous (N,) in the scores' dtype");
  Tensor w = weight ? as_contiguous(to_dtype(*weight, x.scalar_type())) : Tensor();
  // Into `out` (which may be x itself: each entry is read before it is written), or a
  // cached buffer (no page faults per step).
  if (out) {
    LINCLASS_CHECK(out->sizes() == x.sizes() && out->scalar_type() == x.scalar_type() &&
                    out->is_contiguous() && x_.is_contiguous(),
                "_ce_shard_grad: out must be a contiguous tensor like the scores");
  }
  Tensor g = out ? *out : empty_cached({N, C}, x.scalar_type());
  LINCLASS_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), "_ce_shard_grad", [&] {
    ce_grad_rows<scalar_t>(x.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), N, C,
                           start, ignore_index, weight ? w.const_data_ptr<scalar_t>() : nullptr,
                           shift.const_data_ptr<scalar_t>(), exp_coef.const_data_ptr<scalar_t>(),
                           weight_coef.const_data_ptr<scalar_t>(),
                           target_grad.const_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>());
  });
  return g;
}

std::tuple<Tensor, Tensor> mm_shard_grad_cpu(const Tensor& x_, const Tensor& target_,
                                                 int64_t start, const Tensor& x_y,
                                                 const Tensor& row_coef, int64_t p,
                                                 double margin, bool compute_grad) {
  check_shard(x_, target_, "_mm_shard_grad");
  LINCLASS_CHECK(p == 1 || p == 2, "_mm_shard_grad: p must be 1 or 2");
  const Tensor x = as_contiguous(x_), target = as_contiguous(target_);
  const int64_t N = x.size(0), C = x.size(1);
  for (const Tensor* t : {&x_y, &row_coef})
    LINCLASS_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == x.scalar_type() &&
                    t->is_contiguous(),
                "_mm_shard_grad: row values must be contiguous (N,) in the scores' dtype");
  Tensor stats = empty({2, N}, x);
  Tensor g = compute_grad ? empty_cached({N, C}, x.scalar_type()) : empty_none(x);
  LINCLASS_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), "_mm_shard_grad", [&] {
    mm_grad_rows<scalar_t>(x.const_data_ptr<scalar_t>(), target.const_data_ptr<int64_t>(), N, C,
                           start, x_y.const_data_ptr<scalar_t>(), row_coef.const_data_ptr<scalar_t>(),
                           p, scalar_t(margin), stats.mutable_data_ptr<scalar_t>(),
                           compute_grad ? g.mutable_data_ptr<scalar_t>() : nullptr);
  });
  return {stats, g};
}

Tensor ce_probs_shard_stats_cpu(const Tensor& x_, const Tensor& target_, const OptTensor& weight,
                                double label_smoothing, int64_t classes) {
  check_probs_shard(x_, target_, "_ce_probs_shard_stats");
  const Tensor x = as_contiguous(x_), target = as_contiguous(target_);
  const Tensor w = shard_weight(weight, x, "_ce_probs_shard_stats");
  const int64_t N = x.size(0);
  Tensor out = empty({4, N}, x);
  LINCLASS_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), "_ce_probs_shard_stats", [&] {
    ce_probs_stats_rows<scalar_t>(x.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), N,
                                  probs_params<scalar_t>(x, w, label_smoothing, classes, 1.0),
                                  out.mutable_data_ptr<scalar_t>());
  });
  return out;
}

Tensor ce_probs_shard_grad_cpu(const Tensor& x_, const Tensor& target_, const OptTensor& weight,
                               double label_smoothing, int64_t classes, const Tensor& shift,
                               const Tensor& exp_coef, double scale) {
  check_probs_shard(x_, target_, "_ce_probs_shard_grad");
  const Tensor x = as_contiguous(x_), target = as_contiguous(target_);
  const Tensor w = shard_weight(weight, x, "_ce_probs_shard_grad");
  const int64_t N = x.size(0), C = x.size(1);
  for (const Tensor* t : {&shift, &exp_coef})
    LINCLASS_CHECK(t->dim() == 1 && t->size(0) == N && t->scalar_type() == x.scalar_type() &&
                       t->is_contiguous(),
                   "_ce_probs_shard_grad: row coefficients must be contiguous (N,) in the scores' dtype");
  Tensor g = empty_cached({N, C}, x.scalar_type());
  LINCLASS_DISPATCH_FLOAT_DOUBLE(x.scalar_type(), "_ce_probs_shard_grad", [&] {
    ce_probs_grad_rows<scalar_t>(x.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(), N,
                                 probs_params<scalar_t>(x, w, label_smoothing, classes, scale),
                                 shift.const_data_ptr<scalar_t>(), exp_coef.const_data_ptr<scalar_t>(),
                                 g.mutable_data_ptr<scalar_t>());
  });
  return g;
}

}  // namespace linclass
