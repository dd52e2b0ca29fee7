// linclass::linear_cross_entropy and ::linear_multi_margin_loss on CPU: loss(X W^T + b, y)
// and its gradients for X, W and b, a block of rows at a time (linear_blocks.h), so the
// N x C scores never exist.  Per block: S = X_b W^T + b (GEMM; small_gemm.h for
// C <= small_gemm_max_classes(), skinny_gemm.h for takes_few_row_products), the fused loss
// kernel turns S into dS in place (and sums the block's losses), then dX_b = dS W,
// dW += dS^T X_b, db += column sums of dS.  Extra memory is one block of scores (plus a
// float32 dW accumulator for bfloat16/float16, and where the CPU emulates their products
// a float32 copy of W and the block's float32 scores), never N x C.
#include "cpu/ops.h"

#include "buffer_cache.h"
#include "common.h"
#include "cross_entropy.h"
#include "linear_blocks.h"
#include "multi_margin.h"
#include "skinny_gemm.h"
#include "small_gemm.h"

namespace linclass {
namespace {

// Rows per block: at least kDepthRows, the depth of each block's dW += dS^T X_b product
// (blocks sized to keep X_b in a few MiB of cache made that product shallow, and the
// step slower than deeper blocks that re-read X_b from L3 or memory:
// bench/results/linear-gemm-floor.md); more while the input block stays within 4 MiB;
// the score block within kMaxScoreBlockBytes caps it, but at least 32 rows so that the
// GEMMs stay efficient.
constexpr int64_t kDepthRows = 1024;
constexpr int64_t kMaxScoreBlockBytes = int64_t(64) << 20;
int64_t block_rows(int64_t N, int64_t D, int64_t C, int64_t elem) {
  if (const int64_t o = linear_block_rows_override()) return std::max<int64_t>(1, o);
  const int64_t by_input = (int64_t(4) << 20) / std::max<int64_t>(1, D * elem);
  const int64_t by_scores = kMaxScoreBlockBytes / std::max<int64_t>(1, C * elem);
  const int64_t rows = std::min(std::max(kDepthRows, by_input), by_scores);
  return std::min(std::max<int64_t>(32, rows), std::max<int64_t>(N, 1));
}

// Few classes in float32 with unit-stride rows: each block runs as one
// cpu::small_linear_block (scores, loss, dX and dW sub-block by sub-block in cache).
template <typename Math, typename Params>
double linear_small_cpu(const Tensor& X, const Tensor& W, const OptTensor& b,
                        const Tensor& target, const float* lane_targets, const Params& p,
                        const Mask& mask, Grads& grads) {
  const int64_t N = X.size(0), D = X.size(1), C = W.size(0);
  const bool any_grad = mask[0] || mask[1] || mask[2];
  const Tensor Wr = as_contiguous(W);  // C x D: a copy only for a transposed W
  const Tensor br = b ? as_contiguous(*b) : Tensor();
  const int64_t o = linear_block_rows_override();
  const int64_t BR = o ? std::max<int64_t>(1, o) : cpu::kSubBlocks * cpu::small_sub_rows(D);
  Tensor S = empty_cached({std::min(BR, std::max<int64_t>(N, 1)), C}, X.scalar_type());
  cpu::SmallLinear a;
  a.ldx = X.stride(0);
  a.W = Wr.const_data_ptr<float>();
  a.ldw = D;
  a.b = b ? br.const_data_ptr<float>() : nullptr;
  a.D = D;
  a.C = C;
  a.S = S.mutable_data_ptr<float>();
  a.weight_grad = mask[1];
  a.lddx = D;
  cpu::SmallWeightGrad wgrad;
  std::vector<double> db(size_t(C), 0.0);
  const int64_t* tp = target.const_data_ptr<int64_t>();
  double total = 0;
  for (int64_t r0 = 0; r0 < N; r0 += BR) {
    a.n = std::min(BR, N - r0);
    a.X = X.const_data_ptr<float>() + r0 * a.ldx;
    a.dX = mask[0] ? grads.input.mutable_data_ptr<float>() + r0 * D : nullptr;
    total += cpu::small_linear_block(a, [&](float* s, int64_t first, int64_t rows) {
      cpu::RowTask<float> task;  // the loss kernel on the sub-block's scores, in place
      task.input = s;
      task.in.outer = rows;
      task.in.classes = C;
      task.in.stride_n = C;
      if (any_grad) {
        task.grad = s;
        task.gout = task.in;
      }
      task.target = tp + r0 + first;
      task.lane_targets = lane_targets ? lane_targets + r0 + first : nullptr;
      return cpu::run_rows_sum<float, Math>(task, p);
    }, wgrad);
    if (mask[2])  // db: column sums of dS, rows in order
      for (int64_t r = 0; r < a.n; ++r)
        for (int64_t c = 0; c < C; ++c) db[c] += a.S[r * C + c];
  }
  if (mask[1]) wgrad.finish(grads.weight.mutable_data_ptr<float>(), C * D);
  if (mask[2]) {
    float* g = grads.bias.mutable_data_ptr<float>();
    for (int64_t c = 0; c < C; ++c) g[c] = float(db[c]);
  }
  return total;
}

// The fused loss kernel over a block of scores Sb (rows r0 on), in place: Sb becomes dS
// when a gradient is wanted.  Returns the block's summed loss.
template <typename scalar_t, typename Math, typename Params>
double loss_block(Tensor& Sb, const Tensor& target, const acc_type<scalar_t>* lane_targets,
                  int64_t r0, bool any_grad, const Params& p) {
  cpu::RowTask<scalar_t> task;
  task.input = Sb.const_data_ptr<scalar_t>();
  task.in = *row_geometry(Sb);
  if (any_grad) {
    task.grad = Sb.mutable_data_ptr<scalar_t>();
    task.gout = task.in;
  }
  task.target = target.const_data_ptr<int64_t>() + r0;
  task.lane_targets = lane_targets ? lane_targets + r0 : nullptr;
  return cpu::run_rows_sum<scalar_t, Math>(task, p);
}

// Whether the N rows take skinny_gemm.h's products (as one block) rather than the BLAS
// blocks': every batch of at most kSkinnyRows rows (there the BLAS's fixed costs and
// general GEMMs cost more, whatever W's size); up to kSkinnyChunkRows rows while W stays
// in L2 (1 MiB) and a 16-row partial of dX in L1 (rows of at most 2 KiB); and up to
// kSkinnyManyRows rows of at most cpu::kLaneScoresMaxD features (the BLAS is slow at so
// short a product) through such a weight, their scores within a BLAS block's cap
// (bench/results/linear-gemm-floor.md, `small_gemm_ab.py --few-rows`).
constexpr int64_t kSkinnyChunkRows = 4 * cpu::kSkinnyRows;
constexpr int64_t kSkinnyManyRows = 1024;
bool takes_few_row_products(int64_t N, int64_t D, int64_t C, int64_t elem) {
  if (N <= cpu::kSkinnyRows) return N >= 1;
  if (C * D * elem > (int64_t(1) << 20)) return false;
  if (N <= kSkinnyChunkRows) return D * elem <= 2048;
  return N <= kSkinnyManyRows && D <= cpu::kLaneScoresMaxD && N * C * elem <= kMaxScoreBlockBytes;
}

// Whether a handful of rows that could take the register-blocked products (small_gemm.h)
// run faster on the few-row ones: the register-blocked dW is summed from partials of
// the whole C x D (written, then added into dW), and through a weight of 32 classes or
// more and 32K elements or more those passes cost more than the few-row products' one
// stream over dW (with 10-20 classes the register-blocked ones stay ahead from 2 rows:
// bench/results/linear-gemm-floor.md).
bool few_rows_beat_small_gemm(int64_t N, int64_t D, int64_t C) {
  return N <= 8 && C >= 32 && C * D >= 32768;
}

// The N rows as one block, with skinny_gemm.h's products (unit-stride rows of X and W;
// float32/64).
template <typename scalar_t, typename Math, typename Params>
double linear_skinny_cpu(const Tensor& X, const Tensor& W, const OptTensor& b,
                         const Tensor& target, const scalar_t* lane_targets, const Params& p,
                         const Mask& mask, Grads& grads) {
  const int64_t N = X.size(0), D = X.size(1), C = W.size(0);
  const Tensor br = b ? as_contiguous(*b) : Tensor();
  Tensor S = empty_cached({N, C}, X.scalar_type());
  scalar_t* s = S.mutable_data_ptr<scalar_t>();
  // X's rows copied at a padded stride (skinny_stride): a user's rows 4 KiB apart
  // (D = 1024 floats) made the backward ~5x slower.
  const int64_t ldx = cpu::skinny_stride<scalar_t>(D);
  // Uninitialized: nothing reads a row's padding past D.
  const std::unique_ptr<scalar_t[]> xp(new scalar_t[size_t(N * ldx)]);
  for (int64_t i = 0; i < N; ++i)
    std::copy_n(X.const_data_ptr<scalar_t>() + i * X.stride(0), D, xp.get() + i * ldx);
  const scalar_t* x = xp.get();
  const scalar_t* w = W.const_data_ptr<scalar_t>();
  cpu::skinny_scores(x, ldx, w, W.stride(0), b ? br.const_data_ptr<scalar_t>() : nullptr, N, D,
                     C, s);
  const double total =
      loss_block<scalar_t, Math>(S, target, lane_targets, 0, mask[0] || mask[1] || mask[2], p);
  if (mask[0] || mask[1])
    cpu::skinny_backward(s, N, C, x, ldx, w, W.stride(0), D,
                         mask[0] ? grads.input.mutable_data_ptr<scalar_t>() : nullptr,
                         mask[1] ? grads.weight.mutable_data_ptr<scalar_t>() : nullptr);
  if (mask[2]) {  // db = column sums of dS, rows in order
    scalar_t* db = grads.bias.mutable_data_ptr<scalar_t>();
    std::copy(s, s + C, db);
    for (int64_t i = 1; i < N; ++i)
      for (int64_t c = 0; c < C; ++c) db[c] += s[i * C + c];
  }
  return total;
}

template <typename scalar_t, typename Math, typename Params>
double linear_blocks_cpu(const Tensor& X, const Tensor& W, const OptTensor& b,
                         const Tensor& target, const acc_type<scalar_t>* lane_targets,
                         const Params& p, const Mask& mask, Grads& grads) {
  const int64_t N = X.size(0), D = X.size(1), C = W.size(0);
  constexpr bool kFloat = std::is_same_v<scalar_t, float>;
  const bool few_rows = (kFloat || std::is_same_v<scalar_t, double>) &&
                        takes_few_row_products(N, D, C, sizeof(scalar_t)) && X.stride(1) == 1 &&
                        W.stride(1) == 1 && !linear_block_rows_override();
  if constexpr (kFloat)
    if (C <= cpu::small_gemm_max_classes() && X.stride(1) == 1 &&
        !(few_rows && few_rows_beat_small_gemm(N, D, C)))
      return linear_small_cpu<Math>(X, W, b, target, lane_targets, p, mask, grads);
  if constexpr (kFloat || std::is_same_v<scalar_t, double>)
    if (few_rows)
      return linear_skinny_cpu<scalar_t, Math>(X, W, b, target, lane_targets, p, mask, grads);
  const bool any_grad = mask[0] || mask[1] || mask[2];
  GradAccumulator acc(grads, mask, acc_scalar_type(X.scalar_type()), false, N);
  // 16-bit inputs whose products this CPU only emulates: the products in float32 on
  // converted operands (GradAccumulator::widens_products), the scores rounded to the
  // input dtype before the loss, as F.linear's are.  Blocks are then sized by their
  // float32 scores, which the 16-bit ones sit beside.
  const bool widen = acc.widens_products();
  const ScalarType f32 = ScalarType::Float;
  const int64_t BR = block_rows(N, D, C, widen ? 4 : X.element_size());
  const int64_t block = std::min(BR, std::max<int64_t>(N, 1));
  // Up to 64 MiB: from the buffer cache, not page-faulted afresh each call.
  Tensor S = empty_cached({block, C}, X.scalar_type());
  Tensor Sf, Wf, bf;
  if (widen) {
    Sf = empty_cached({block, C}, f32);
    Wf = empty_cached({C, D}, f32);
    copy_into(Wf, W);
    if (b) bf = to_dtype(*b, f32);
  }
  const Tensor Wt = transposed(widen ? Wf : W);
  double total = 0;
  for (int64_t r0 = 0; r0 < N; r0 += BR) {
    const int64_t n = std::min(BR, N - r0);
    Tensor Sb = narrowed(S, 0, 0, n);
    const Tensor Xb = narrowed(X, 0, r0, n);
    const Tensor Xf = widen ? to_dtype(Xb, f32) : Tensor();
    const Tensor Sfb = widen ? narrowed(Sf, 0, 0, n) : Tensor();
    const Tensor& out = widen ? Sfb : Sb;
    block_product(out, widen ? Xf : Xb, Wt, b ? OptTensor(widen ? bf : *b) : std::nullopt);
    if (widen) copy_into(Sb, Sfb);
    total += loss_block<scalar_t, Math>(Sb, target, lane_targets, r0, any_grad, p);
    if (!any_grad) continue;
    if (widen)
      acc.add_in_float32(Sb, Sfb, Xf, Wf, r0);
    else
      acc.add(Sb, Xb, W, r0);
  }
  acc.finish();
  return total;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_cpu(
    const Tensor& input, const Tensor& weight, const OptTensor& bias,
    const Tensor& target_, int64_t ignore_index, double label_smoothing, int64_t reduction,
    Mask mask) {
  check_linear_args("linear_cross_entropy", input, weight, bias, target_, reduction, mask);
  LINCLASS_CHECK(label_smoothing <= 1.0, "linear_cross_entropy: label_smoothing must be <= 1, got ",
              label_smoothing);
  const Tensor target = as_contiguous(target_);
  Grads grads = empty_grads(input, weight, mask);
  Tensor loss = empty({}, acc_scalar_type(input.scalar_type()), input);
  LINCLASS_DISPATCH_FLOATING(input.scalar_type(), "linear_cross_entropy_cpu", [&] {
    // A linear layer has no class weights: the loss's `weight` stays None.
    const cpu::CrossEntropySetup<scalar_t> setup(target, std::nullopt, weight.size(0), ignore_index,
                                                 label_smoothing, reduction);
    const double total = linear_blocks_cpu<scalar_t, cpu::CrossEntropyMath>(
        input, weight, bias, target, setup.lane_targets.data(), setup.params, mask, grads);
    *loss.mutable_data_ptr<acc_type<scalar_t>>() = acc_type<scalar_t>(reduction == kMean ? total / setup.denom : total);
  });
  return {loss, grads.input, grads.weight, grads.bias};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_multi_margin_loss_cpu(
    const Tensor& input, const Tensor& weight, const OptTensor& bias,
    const Tensor& target_, int64_t p, double margin, int64_t reduction, Mask mask) {
  check_linear_args("linear_multi_margin_loss", input, weight, bias, target_, reduction, mask);
  LINCLASS_CHECK(p == 1 || p == 2, "linear_multi_margin_loss: only p == 1 and p == 2 supported, got ", p);
  const Tensor target = as_contiguous(target_);
  Grads grads = empty_grads(input, weight, mask);
  Tensor loss = empty({}, acc_scalar_type(input.scalar_type()), input);
  LINCLASS_DISPATCH_FLOATING(input.scalar_type(), "linear_multi_margin_loss_cpu", [&] {
    const cpu::MultiMarginSetup<scalar_t> setup(target, std::nullopt, weight.size(0), p, margin, reduction);
    const double total = linear_blocks_cpu<scalar_t, cpu::MultiMarginMath>(
        input, weight, bias, target, setup.lane_targets.data(), setup.params, mask, grads);
    *loss.mutable_data_ptr<acc_type<scalar_t>>() = acc_type<scalar_t>(reduction == kMean ? total / setup.denom : total);
  });
  return {loss, grads.input, grads.weight, grads.bias};
}

}  // namespace linclass
