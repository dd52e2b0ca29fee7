// linclass::cross_entropy_probs on CPU: the softmax cross-entropy against class
// probabilities (F.cross_entropy with a float target of the input's shape: soft labels,
// mixup, distillation), its loss and gradient in one pass over each row.
//
// For row x (C scores), target row t, class weights w (1 without) and label smoothing
// eps, with t'_j = (1 - eps) t_j + eps / C, m = max_j x_j, d_j = x_j - m,
// s = sum_j exp(d_j), T = sum_j w_j t'_j and A = sum_j w_j t'_j d_j:
//   loss = -sum_j w_j t'_j log_softmax(x)_j = T log(s) - A
//   d loss / d x_j = exp(d_j) T / s - w_j t'_j
// torch's 'mean' divides by the number of rows (not by the weights' sum, as the
// class-index loss does), 'sum' adds the rows, 'none' keeps one loss per row.  Every
// term is formed from the shifted scores d_j <= 0, so nothing cancels for large scores
// (torch forms log_softmax first, then the products).  Like torch: a +inf score or a
// row of -inf gives NaN (loss and the row's gradient), and a -inf score with target 0
// makes the loss NaN (0 * -inf), its gradient entry 0.
//
// Rows are made contiguous (input and target); 16-bit rows are converted to float32
// per row.  Three passes over a row that stays in cache: its max, the exponentials
// (kept in a scratch row) with the three sums, the gradient.
#include "cpu/ops.h"

#include "buffer_cache.h"
#include "common.h"
#include "row_driver.h"

namespace linclass {
namespace cpu {
namespace {

template <typename acc_t>
struct ProbsParams {
  int64_t classes;
  const acc_t* weight;  // nullptr: every class weighs 1
  acc_t keep;           // 1 - label_smoothing
  acc_t spread;         // label_smoothing / C
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

// One row's loss; with g, its gradient to g (through `stream` when set), the
// exponentials kept in `work` (C elements) between the passes.
template <typename acc_t>
acc_t probs_row(const acc_t* x, const acc_t* t, acc_t* work, acc_t* g, LineStream<acc_t>* stream,
                const ProbsParams<acc_t>& p) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t C = p.classes;
  const acc_t m = max_of(x, C);
  if (!std::isfinite(m)) {  // a +inf score, or every score -inf
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    if (g) store_map(g, 0, C, stream, [nan](int64_t, int64_t) { return V(nan); });
    return nan;
  }
  const V vm(m), zero(acc_t(0));
  V s = zero, total = zero, a = zero;
  for (int64_t j = 0; j < C; j += W) {
    const int64_t n = std::min<int64_t>(W, C - j);
    const V d = V::loadu(x + j, n) - vm;
    const V e = n < W ? V::set(zero, vexp(d), n) : vexp(d);
    if (g) e.store(work + j, n);
    const V wt = weighted_target(t, j, n, p);
    s = s + e;
    total = total + wt;
    a = fmadd(wt, d, a);  // lanes past n: 0 * (-m), finite
  }
  const acc_t sum = hsum(s), weight_total = hsum(total);
  if (g) {
    const V coef(p.scale * weight_total / sum), scale(p.scale);
    store_map(g, 0, C, stream, [&](int64_t j, int64_t n) {
      return coef * V::loadu(work + j, n) - scale * weighted_target(t, j, n, p);
    });
  }
  return weight_total * std::log(sum) - hsum(a);
}

// Rows [begin, end) of a block: losses to loss_rows (when set) and their sum returned.
template <typename scalar_t>
double probs_rows(const scalar_t* x, const scalar_t* t, scalar_t* g, bool stream_grad,
                  int64_t begin, int64_t end, const ProbsParams<acc_type<scalar_t>>& p,
                  acc_type<scalar_t>* loss_rows) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  const int64_t C = p.classes;
  // work: the exponentials; 16-bit rows also stage x, t and the gradient in acc_t.
  std::vector<acc_t> buf(kConvert ? 4 * C : C);
  acc_t* work = buf.data();
  acc_t *xs = nullptr, *ts = nullptr, *gs = nullptr;
  if constexpr (kConvert) {
    xs = work + C;
    ts = work + 2 * C;
    gs = work + 3 * C;
  }
  LineStream<acc_t> line;
  LineStream<acc_t>* stream = (!kConvert && stream_grad) ? &line : nullptr;
  double sum = 0;
  for (int64_t r = begin; r < end; ++r) {
    const scalar_t* xr = x + r * C;
    const scalar_t* tr = t + r * C;
    scalar_t* gr = g ? g + r * C : nullptr;
    acc_t loss;
    if constexpr (kConvert) {
      convert(xr, xs, C);
      convert(tr, ts, C);
      loss = probs_row<acc_t>(xs, ts, work, gr ? gs : nullptr, nullptr, p);
      if (gr) convert(gs, gr, C);
    } else {
      loss = probs_row<acc_t>(xr, tr, work, gr, stream, p);
    }
    if (loss_rows) loss_rows[r] = loss;
    sum += double(loss);
  }
  if (stream) line.finish();
  return sum;
}

}  // namespace
}  // namespace cpu

std::tuple<Tensor, Tensor> cross_entropy_probs_cpu(const Tensor& input_, const Tensor& target_,
                                                   const OptTensor& weight, double label_smoothing,
                                                   int64_t reduction, bool compute_grad) {
  check_cross_entropy_probs_args(input_, target_, weight, label_smoothing, reduction);
  const Tensor input = as_contiguous(input_);
  const Tensor target = as_contiguous(target_);
  const int64_t C = input.dim() == 1 ? input.size(0) : input.size(1);
  const int64_t rows = input.dim() == 1 ? 1 : input.size(0);

  std::vector<int64_t> loss_shape;  // 'none': one loss per row; else a 0-dim tensor
  if (reduction == kNone && input.dim() == 2) loss_shape.push_back(rows);
  Tensor loss = empty(IntList(loss_shape.data(), loss_shape.size()), acc_scalar_type(input.scalar_type()), input);
  // The gradient in the input's layout where it is dense (the fake kernel's rule),
  // written contiguous first when that is another layout.
  Tensor grad = compute_grad ? empty_cached_like(input_) : empty_none(input);
  const bool relayout = compute_grad && !grad.is_contiguous();
  const Tensor written = relayout ? empty_cached(grad.sizes(), grad.scalar_type()) : grad;

  LINCLASS_DISPATCH_FLOATING(input.scalar_type(), "cross_entropy_probs_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    std::vector<acc_t> weights;
    if (weight.has_value()) {
      const Tensor w = as_contiguous(*weight);
      weights.resize(C);
      cpu::convert(w.const_data_ptr<scalar_t>(), weights.data(), C);
    }
    const cpu::ProbsParams<acc_t> p{C, weight.has_value() ? weights.data() : nullptr,
                                    acc_t(1.0 - label_smoothing), acc_t(label_smoothing / double(C)),
                                    acc_t(reduction == kMean ? 1.0 / double(rows) : 1.0)};
    const scalar_t* x = input.const_data_ptr<scalar_t>();
    const scalar_t* t = target.const_data_ptr<scalar_t>();
    scalar_t* g = compute_grad ? written.mutable_data_ptr<scalar_t>() : nullptr;
    acc_t* loss_rows = reduction == kNone ? loss.mutable_data_ptr<acc_t>() : nullptr;
    const bool stream_grad = compute_grad && cpu::stream_gradient(nbytes(written));
    // Blocks fixed by (rows, C) and summed in order: the same bits at any thread count.
    const int64_t block = std::max<int64_t>(1, cpu::kBlockElements / std::max<int64_t>(C, 1));
    const int64_t blocks = rows == 0 ? 0 : (rows + block - 1) / block;
    std::vector<double> partials(blocks, 0.0);
    if (C == 0 && loss_rows) std::fill(loss_rows, loss_rows + rows, acc_t(0));  // no classes: no terms
    if (C > 0)
      parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b)
          partials[b] = cpu::probs_rows<scalar_t>(x, t, g, stream_grad, b * block,
                                                  std::min(rows, (b + 1) * block), p, loss_rows);
      });
    if (reduction != kNone) {
      double total = 0;
      for (double part : partials) total += part;
      // 'mean' over no rows: NaN, as torch's.
      *loss.mutable_data_ptr<acc_t>() = acc_t(reduction == kMean ? total / double(rows) : total);
    }
  });
  if (relayout) copy_into(grad, written);
  return {loss, grad};
}

}  // namespace linclass
