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
// Scores are walked where they lie (rows of contiguous classes, or positions innermost;
// else a contiguous copy), the target in the same layout.  Rows of more than
// kProbsLaneMaxClasses classes go one at a time: three passes over a row that stays in
// cache (its max; the exponentials, kept in a scratch row, with the three sums; the
// gradient).  Shorter rows go W = Vec::size() a tile, transposed into SIMD lanes (one
// row per lane: no horizontal sums).  Positions innermost (contiguous K-dimensional
// scores (N, C, d1, ..., dk), column-major (N, C)) are in lanes as they lie:
// x[n, j, k .. k + W) is a vector of W positions' class j.  16-bit values are converted
// to float32 a row (a tile) at a time.
#include "cpu/ops.h"

#include "buffer_cache.h"
#include "common.h"
#include "cross_entropy_probs.h"
#include "row_driver.h"

namespace linclass {
namespace cpu {
namespace {

// One row's loss; with g, its gradient to g (through `stream` when set), the
// exponentials kept in `work` (C elements) between the passes.
template <typename acc_t>
acc_t probs_row(const acc_t* x, const acc_t* t, acc_t* work, acc_t* g, LineStream<acc_t>* stream,
                const ProbsParams<acc_t>& p) {
  using V = Vec<acc_t>;
  const int64_t C = p.classes;
  const acc_t m = max_of(x, C);
  if (!std::isfinite(m)) {  // a +inf score, or every score -inf
    const acc_t nan = std::numeric_limits<acc_t>::quiet_NaN();
    if (g) store_map(g, 0, C, stream, [nan](int64_t, int64_t) { return V(nan); });
    return nan;
  }
  const ProbsSums<acc_t> sums = probs_row_sums(x, t, m, g ? work : nullptr, p);
  if (g) {
    const V coef(p.scale * sums.total / sums.s), scale(p.scale);
    store_map(g, 0, C, stream, [&](int64_t j, int64_t n) {
      return coef * V::loadu(work + j, n) - scale * weighted_target(t, j, n, p);
    });
  }
  return sums.total * std::log(sums.s) - sums.a;
}

// W positions in SIMD lanes (the first `lanes` of them): class j of lane l at
// x[j * xs + l], t[j * ts + l], g[j * gs + l]; the exponentials kept in work[j * W + l].
// The lanes' losses to loss[0, lanes).  Lanes past `lanes` load zeros and are dropped.
// With `stream`, the gradient's vectors (whole, aligned cache lines) are written with
// non-temporal stores.
template <typename acc_t>
void probs_lanes(const acc_t* x, int64_t xs, const acc_t* t, int64_t ts, acc_t* work, acc_t* g,
                 int64_t gs, int64_t lanes, const ProbsParams<acc_t>& p, acc_t* loss,
                 bool stream = false) {
  using V = Vec<acc_t>;
  constexpr int64_t W = V::size();
  const int64_t C = p.classes;
  V m(-std::numeric_limits<acc_t>::infinity());
  for (int64_t j = 0; j < C; ++j) m = fast_max(m, V::loadu(x + j * xs, lanes));
  // A lane whose max is +inf or -inf gets NaN through d (inf - inf) and vexp, as the
  // row kernel's NaN rows.
  const V keep(p.keep), spread(p.spread), zero(acc_t(0));
  const auto weighted = [&](int64_t j) {
    const V wt = fmadd(V::loadu(t + j * ts, lanes), keep, spread);
    return p.weight ? wt * V(p.weight[j]) : wt;
  };
  // Each lane sums its C terms alone: in blocks of kSumBlock classes, then the blocks,
  // so a sum rounds ~kSumBlock + C / kSumBlock times instead of ~C times (float32 over
  // thousands of classes: bench/results/cross-entropy-probs.md, Precision).
  constexpr int64_t kSumBlock = 32;
  V s = zero, total = zero, a = zero;
  for (int64_t j0 = 0; j0 < C; j0 += kSumBlock) {
    V s_block = zero, total_block = zero, a_block = zero;
    for (int64_t j = j0; j < std::min(C, j0 + kSumBlock); ++j) {
      const V d = V::loadu(x + j * xs, lanes) - m;
      const V e = vexp(d);
      if (g) e.store(work + j * W);
      const V wt = weighted(j);
      s_block = s_block + e;
      total_block = total_block + wt;
      a_block = fmadd(wt, d, a_block);
    }
    s = s + s_block;
    total = total + total_block;
    a = a + a_block;
  }
  (total * vlog(s) - a).store(loss, lanes);
  if (g) {
    const V scale(p.scale), coef = scale * total / s;
    for (int64_t j = 0; j < C; ++j) {
      const V out = coef * V::loadu(work + j * W) - scale * weighted(j);
      if (stream)
        stream_store(g + j * gs, out);
      else
        out.store(g + j * gs, lanes);
    }
  }
}

// Tiles [u0, u1) of K-dimensional scores with K positions per image, `tiles` tiles of W
// positions per image: losses to loss_rows (when set, position-major) and their sum.
// Scratch for tiles of W lanes x C classes: the exponentials and, where tiles are
// staged (transposed rows, converted 16-bit values), the scores, target and gradient.
template <typename acc_t>
struct TileScratch {
  static constexpr int64_t W = Vec<acc_t>::size();
  TileScratch(int64_t classes, bool staged) : C(classes), buf((staged ? 4 : 1) * classes * W) {}
  acc_t* work() { return buf.data(); }
  acc_t* x() { return buf.data() + C * W; }
  acc_t* t() { return buf.data() + 2 * C * W; }
  acc_t* g() { return buf.data() + 3 * C * W; }
  // The first n lanes' losses of `out`: to loss_rows[at ..) when set, and to *sum.
  static void take(const acc_t* out, int64_t n, acc_t* loss_rows, int64_t at, double* sum) {
    if (loss_rows) std::copy(out, out + n, loss_rows + at);
    for (int64_t l = 0; l < n; ++l) *sum += double(out[l]);
  }

  int64_t C;
  std::vector<acc_t> buf;
};

// With stream_grad (a gradient beyond the caches), tiles whose class vectors are whole
// aligned cache lines (W x acc_t = 64 bytes: the AVX-512 builds) stream them to memory.
template <typename scalar_t>
double probs_tiles(const scalar_t* x, const scalar_t* t, scalar_t* g, int64_t K, int64_t tiles,
                   int64_t u0, int64_t u1, const ProbsParams<acc_type<scalar_t>>& p,
                   acc_type<scalar_t>* loss_rows, bool stream_grad) {
  using acc_t = acc_type<scalar_t>;
  constexpr bool kConvert = !std::is_same_v<scalar_t, acc_t>;
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t C = p.classes;
  TileScratch<acc_t> scratch(C, /*staged=*/kConvert);  // 16-bit tiles are converted
  acc_t *work = scratch.work(), *xs = scratch.x(), *ts = scratch.t(), *gs = scratch.g();
  acc_t out[W];
  double sum = 0;
  bool streamed = false;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t image = u / tiles, k0 = (u % tiles) * W;
    const int64_t lanes = std::min<int64_t>(W, K - k0);
    const int64_t at = image * C * K + k0;
    if constexpr (kConvert) {
      for (int64_t j = 0; j < C; ++j) {
        convert(x + at + j * K, xs + j * W, lanes);
        convert(t + at + j * K, ts + j * W, lanes);
      }
      probs_lanes<acc_t>(xs, W, ts, W, work, g ? gs : nullptr, W, lanes, p, out);
      if (g)
        for (int64_t j = 0; j < C; ++j) convert(gs + j * W, g + at + j * K, lanes);
    } else {
      constexpr bool kLineVectors = W * sizeof(acc_t) == 64;
      const bool stream = kLineVectors && stream_grad && lanes == W && K % W == 0 &&
                          reinterpret_cast<uintptr_t>(g + at) % 64 == 0;
      probs_lanes<acc_t>(x + at, K, t + at, K, work, g ? g + at : nullptr, K, lanes, p, out, stream);
      streamed |= stream;
    }
    scratch.take(out, lanes, loss_rows, image * K + k0, &sum);
  }
  if (streamed) stream_fence();  // the streamed stores ordered before the task ends
  return sum;
}

// Rows of up to kProbsLaneMaxClasses classes take the lanes too, W rows a tile
// transposed in and out (pack_tile / unpack_tile): on such short rows the row path's
// horizontal sums and partial vectors are most of the work
// (bench/results/cross-entropy-probs.md).  Up to 39 (not the class-index losses' lane
// capacity): from 48 classes the row path was faster on the Intel VM, and at 40-47
// the lanes' gain was small (bench/results/class-count-ab.md).
constexpr int64_t kProbsLaneMaxClasses = 39;
static_assert(kProbsLaneMaxClasses <= cpu::kLaneMaxClasses);

// Rows [begin, end) of (N, C) scores, W rows a tile in SIMD lanes: losses to loss_rows
// (when set) and their sum.
template <typename scalar_t>
double probs_row_tiles(const scalar_t* x, const scalar_t* t, scalar_t* g, int64_t begin, int64_t end,
                       const ProbsParams<acc_type<scalar_t>>& p, acc_type<scalar_t>* loss_rows) {
  using acc_t = acc_type<scalar_t>;
  constexpr int64_t W = Vec<acc_t>::size();
  const int64_t C = p.classes;
  RowGeometry rows;  // contiguous (rows, C)
  rows.outer = end;
  rows.classes = C;
  rows.stride_n = C;
  const TilePermutes* permutes = tile_permutes(C);
  const VectorPermutes* to_tile = permutes ? &permutes->to_tile : nullptr;
  const VectorPermutes* to_rows = permutes ? &permutes->to_rows : nullptr;
  TileScratch<acc_t> scratch(C, /*staged=*/true);
  acc_t *work = scratch.work(), *xs = scratch.x(), *ts = scratch.t(), *gs = scratch.g();
  acc_t out[W];
  double sum = 0;
  for (int64_t r0 = begin; r0 < end; r0 += W) {
    const int64_t n = std::min<int64_t>(W, end - r0);
    pack_tile(x, rows, r0, n, xs, to_tile);  // lanes past n: zeros, their results dropped
    pack_tile(t, rows, r0, n, ts, to_tile);
    probs_lanes<acc_t>(xs, W, ts, W, work, g ? gs : nullptr, W, W, p, out);
    if (g) unpack_tile(gs, rows, r0, n, g, to_rows);
    scratch.take(out, n, loss_rows, r0, &sum);
  }
  return sum;
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

// How the kernels walk a dense tensor of scores (or its target, or its gradient) in
// place.  Rows: `images` rows of C contiguous classes one after another (row-major
// (N, C), channels-last maps; rows in the order of the loss's elements).  Lanes:
// `images` blocks of C classes x `positions` positions, positions innermost
// (contiguous (N, C, d1, ...), and column-major (N, C) as one image of N positions).
struct ProbsLayout {
  bool lanes;
  int64_t images, positions;  // rows: images rows of one position each
};

// Whether t's elements are dense in the order of `dims`, innermost first (size-1 dims
// take any stride).
inline bool dense_in_order(const Tensor& t, const std::vector<int64_t>& dims) {
  int64_t expected = 1;
  for (int64_t d : dims) {
    if (t.size(d) != 1 && t.stride(d) != expected) return false;
    expected *= t.size(d);
  }
  return true;
}

inline std::optional<ProbsLayout> probs_layout(const Tensor& t) {
  const int64_t D = t.dim();
  if (D == 1) return dense_in_order(t, {0}) ? std::optional<ProbsLayout>({false, 1, 1}) : std::nullopt;
  if (t.numel() == 0) {  // nothing is read: only the loss's element count matters
    int64_t rows = t.size(0);
    for (int64_t d = 2; d < D; ++d) rows *= t.size(d);
    return ProbsLayout{false, rows, 1};
  }
  int64_t positions = 1;
  std::vector<int64_t> rows_order{1}, lanes_order;
  for (int64_t d = D - 1; d >= 2; --d) {
    positions *= t.size(d);
    rows_order.push_back(d);
    lanes_order.push_back(d);
  }
  rows_order.push_back(0);
  lanes_order.push_back(1);
  lanes_order.push_back(0);
  if (dense_in_order(t, rows_order)) return ProbsLayout{false, t.size(0) * positions, 1};
  if (D > 2 && dense_in_order(t, lanes_order)) return ProbsLayout{true, t.size(0), positions};
  if (D == 2 && dense_in_order(t, {0, 1})) return ProbsLayout{true, 1, t.size(0)};  // x.t()
  return std::nullopt;
}

// Whether a and b (same sizes) lay their elements out alike.
inline bool same_layout(const Tensor& a, const Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d)
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  return true;
}

}  // namespace
}  // namespace cpu

std::tuple<Tensor, Tensor> cross_entropy_probs_cpu(const Tensor& input_, const Tensor& target_,
                                                   const OptTensor& weight, double label_smoothing,
                                                   int64_t reduction, bool compute_grad) {
  check_cross_entropy_probs_args(input_, target_, weight, label_smoothing, reduction);
  // Scores walked where they lie when their layout allows (else a contiguous copy), the
  // target brought to the same layout.
  std::optional<cpu::ProbsLayout> walk = cpu::probs_layout(input_);
  const Tensor input = walk ? input_ : as_contiguous(input_);
  if (!walk) walk = cpu::probs_layout(input);
  Tensor target = target_;
  if (!cpu::same_layout(target_, input)) {
    target = empty_cpu_strided(input.sizes(), input.strides(), input.scalar_type());
    copy_into(target, target_);
  }
  const int64_t C = input.dim() == 1 ? input.size(0) : input.size(1);
  const bool tiled = walk->lanes;
  const int64_t K = walk->positions;  // positions per image of the lanes' walk
  const int64_t rows = walk->images * K;  // = the loss's elements

  std::vector<int64_t> loss_shape;  // 'none': the input's shape without its class dim
  if (reduction == kNone)
    for (int64_t d = 0; d < input.dim(); ++d)
      if (d != 1 && input.dim() > 1) loss_shape.push_back(input.size(d));
  Tensor loss = empty(IntList(loss_shape.data(), loss_shape.size()), acc_scalar_type(input.scalar_type()), input);
  // The gradient in the input's layout where it is dense (the fake kernel's rule),
  // written in the scores' walk first when that is another layout.
  Tensor grad = compute_grad ? empty_cached_like(input_) : empty_none(input);
  const bool relayout = compute_grad && !cpu::same_layout(grad, input);
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
    // Blocks of rows (or of tiles of W positions) fixed by the shape and summed in
    // order: the same bits at any thread count.
    const bool lane_rows = !tiled && C <= cpu::kProbsLaneMaxClasses;
    constexpr int64_t W = cpu::Vec<acc_t>::size();
    const int64_t tiles = (K + W - 1) / W;
    const int64_t units = tiled ? walk->images * tiles : rows;
    const int64_t unit_elements = std::max<int64_t>(C, 1) * (tiled ? W : 1);
    int64_t block = std::max<int64_t>(1, cpu::kBlockElements / unit_elements);
    if (lane_rows) block = (block + W - 1) / W * W;  // whole tiles
    const int64_t blocks = units == 0 ? 0 : (units + block - 1) / block;
    std::vector<double> partials(blocks, 0.0);
    if (C == 0 && loss_rows) std::fill(loss_rows, loss_rows + rows, acc_t(0));  // no classes: no terms
    if (C > 0)
      parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {
          const int64_t u0 = b * block, u1 = std::min(units, u0 + block);
          partials[b] = tiled ? cpu::probs_tiles<scalar_t>(x, t, g, K, tiles, u0, u1, p, loss_rows, stream_grad)
                        : lane_rows ? cpu::probs_row_tiles<scalar_t>(x, t, g, u0, u1, p, loss_rows)
                                    : cpu::probs_rows<scalar_t>(x, t, g, stream_grad, u0, u1, p, loss_rows);
        }
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
