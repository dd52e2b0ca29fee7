// linclass::linear_cross_entropy and ::linear_multi_margin_loss: loss(X W^T + b, y) and
// its gradients for X, W and b, computed block of rows by block of rows so that the
// N x C score matrix never exists.
//
// For each block of rows:  S = X_b W^T + b (GEMM, BR x C; cpu/small_gemm.h for C <= 12)
//                          the fused loss kernel turns S into dS in place (and sums
//                          the block's losses)
//                          dW += dS^T X_b,  db += column sums of dS,  dX_b = dS W
// X_b is read from memory once: the block is sized so that it is still in cache for
// the dW product.  Extra memory is one BR x C block (plus a float32 dW accumulator for
// bfloat16/float16), never N x C.  Blocks run in order and each reduction (losses, db,
// dW) adds them in order, so results do not depend on the thread count.
//
// The CPU path runs the row kernels of cross_entropy.cpp / multi_margin.cpp on the
// block in place.  The CUDA path composes cuBLAS GEMMs with the CUDA loss ops the same
// way, chunk by chunk.  Only 'mean' and 'sum' are fused: with 'none' the gradients
// depend on a per-row grad_output that does not exist yet (linclass.functional then
// composes linear + fused loss).
#include "common.h"
#include "cpu/op_support.h"
#include "cpu/small_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>

namespace linclass {
namespace {

using Mask = std::array<bool, 3>;  // gradients wanted for (input, weight, bias)

// Rows per block: the input block stays within ~4 MiB (cache, for the dW product) and
// the score block within 64 MiB, but at least 32 rows so that the GEMMs stay efficient.
// Tests set a small override (linclass::_linear_block_rows) to exercise many blocks.
std::atomic<int64_t> g_block_rows_override{0};
}  // namespace

int64_t set_linear_block_rows(int64_t rows) { return g_block_rows_override.exchange(rows); }

namespace {

int64_t block_rows(int64_t N, int64_t D, int64_t C, int64_t elem) {
  if (const int64_t o = g_block_rows_override.load()) return std::max<int64_t>(1, o);
  const int64_t by_input = (int64_t(4) << 20) / std::max<int64_t>(1, D * elem);
  const int64_t by_scores = (int64_t(64) << 20) / std::max<int64_t>(1, C * elem);
  return std::min(std::max<int64_t>(32, std::min(by_input, by_scores)), std::max<int64_t>(N, 1));
}

void check_linear_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& target,
                       int64_t reduction, const Mask& mask) {
  TORCH_CHECK(input.dim() == 2, op, ": input must be (N, D), got ", input.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": weight must be (C, D) with D = ", input.size(1), ", got ", weight.sizes());
  TORCH_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " does not match input dtype ", input.scalar_type());
  TORCH_CHECK(weight.device() == input.device(), op, ": weight and input are on different devices");
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be (C,) with C = ", weight.size(0), ", got ", bias->sizes());
    TORCH_CHECK(bias->scalar_type() == input.scalar_type() && bias->device() == input.device(),
                op, ": bias must have the input's dtype and device");
  }
  TORCH_CHECK(!mask[2] || bias, op, ": a bias gradient was asked for without a bias");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == input.size(0), op,
              ": target must be (N,) with N = ", input.size(0), ", got ", target.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64, got ",
              target.scalar_type());
  TORCH_CHECK(reduction == kMean || reduction == kSum, op,
              ": only 'mean' and 'sum' are fused (got reduction code ", reduction, ")");
}

struct Grads {
  at::Tensor input, weight, bias;
};

Grads empty_grads(const at::Tensor& input, const at::Tensor& weight, const Mask& mask) {
  const auto opts = input.options();
  return {mask[0] ? at::empty(input.sizes(), opts) : at::empty({0}, opts),
          mask[1] ? at::empty({weight.size(0), weight.size(1)}, opts) : at::empty({0}, opts),
          mask[2] ? at::empty({weight.size(0)}, opts) : at::empty({0}, opts)};
}

// Accumulates dW, db over blocks in block order; db in acc_type, dW too unless
// `gemm_in_input_dtype` (the GPU: a float32 copy would turn the tensor-core GEMMs into
// float32 ones; cuBLAS accumulates each block's product in float32 and rounds once per
// block).
class GradAccumulator {
 public:
  GradAccumulator(Grads& g, const Mask& mask, at::ScalarType acc_type, bool gemm_in_input_dtype = false)
      : g_(g), mask_(mask), acc_type_(acc_type),
        low_(g.input.scalar_type() != acc_type && !gemm_in_input_dtype) {}

  void add(const at::Tensor& dS, const at::Tensor& Xb, const at::Tensor& W, int64_t r0) {
    if (mask_[0]) {
      at::Tensor rows = g_.input.narrow(0, r0, dS.size(0));
      at::mm_out(rows, dS, W);
    }
    if (mask_[1]) {
      // float32/64 accumulate straight into the output; low precision in a float32 copy.
      const at::Tensor dSt = low_ ? dS.t().to(acc_type_) : dS.t();
      const at::Tensor X = low_ ? Xb.to(acc_type_) : Xb;
      if (!started_) {
        if (low_)
          dW_ = at::mm(dSt, X);  // the first block; later ones accumulate
        else
          at::mm_out(g_.weight, dSt, X);
        started_ = true;
      } else {
        (low_ ? dW_ : g_.weight).addmm_(dSt, X);
      }
    }
    if (mask_[2]) {
      const at::Tensor rows = dS.to(acc_type_);
      db_ = db_.defined() ? db_.add_(rows.sum(0)) : rows.sum(0);
    }
  }

  void finish() {
    if (mask_[1] && !started_) g_.weight.zero_();  // no rows
    if (mask_[1] && dW_.defined()) g_.weight.copy_(dW_);
    if (mask_[2]) {
      if (db_.defined()) g_.bias.copy_(db_);
      else g_.bias.zero_();
    }
  }

 private:
  Grads& g_;
  Mask mask_;
  at::ScalarType acc_type_;
  bool low_, started_ = false;
  at::Tensor dW_, db_;
};

// ---- CPU ---------------------------------------------------------------------------

// Few classes in float32 with unit-stride rows: each block runs as one
// cpu::small_linear_block (scores, loss, dX and dW sub-block by sub-block in cache).
template <typename Math, typename Params>
double linear_small_cpu(const at::Tensor& X, const at::Tensor& W, const std::optional<at::Tensor>& b,
                        const at::Tensor& target, const float* lane_targets, const Params& p,
                        const Mask& mask, Grads& grads) {
  const int64_t N = X.size(0), D = X.size(1), C = W.size(0);
  const bool any_grad = mask[0] || mask[1] || mask[2];
  const at::Tensor Wr = W.contiguous();  // C x D: a copy only for a transposed W
  const at::Tensor br = b ? b->contiguous() : at::Tensor();
  const int64_t o = g_block_rows_override.load();
  const int64_t BR = o ? std::max<int64_t>(1, o) : cpu::kSubBlocks * cpu::small_sub_rows(D);
  at::Tensor S = at::empty({std::min(BR, std::max<int64_t>(N, 1)), C}, X.options());
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

template <typename scalar_t, typename Math, typename Params>
double linear_blocks_cpu(const at::Tensor& X, const at::Tensor& W, const std::optional<at::Tensor>& b,
                         const at::Tensor& target, const at::opmath_type<scalar_t>* lane_targets,
                         const Params& p, const Mask& mask, Grads& grads) {
  const int64_t N = X.size(0), D = X.size(1), C = W.size(0);
  if constexpr (std::is_same_v<scalar_t, float>)
    if (C <= cpu::kSmallGemmC && X.stride(1) == 1)
      return linear_small_cpu<Math>(X, W, b, target, lane_targets, p, mask, grads);
  const bool any_grad = mask[0] || mask[1] || mask[2];
  const int64_t BR = block_rows(N, D, C, X.element_size());
  at::Tensor S = at::empty({std::min(BR, std::max<int64_t>(N, 1)), C}, X.options());
  const at::Tensor Wt = W.t();
  GradAccumulator acc(grads, mask, at::toOpMathType(X.scalar_type()));
  double total = 0;
  for (int64_t r0 = 0; r0 < N; r0 += BR) {
    const int64_t n = std::min(BR, N - r0);
    at::Tensor Sb = S.narrow(0, 0, n);
    const at::Tensor Xb = X.narrow(0, r0, n);
    if (b)
      at::addmm_out(Sb, *b, Xb, Wt);
    else
      at::mm_out(Sb, Xb, Wt);
    cpu::RowTask<scalar_t> task;  // the loss kernel, in place: Sb becomes dS
    task.input = Sb.const_data_ptr<scalar_t>();
    task.in = *row_geometry(Sb);
    if (any_grad) {
      task.grad = Sb.mutable_data_ptr<scalar_t>();
      task.gout = task.in;
    }
    task.target = target.const_data_ptr<int64_t>() + r0;
    task.lane_targets = lane_targets ? lane_targets + r0 : nullptr;
    total += cpu::run_rows_sum<scalar_t, Math>(task, p);
    if (any_grad) acc.add(Sb, Xb, W, r0);
  }
  acc.finish();
  return total;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target_, int64_t ignore_index, double label_smoothing, int64_t reduction,
    Mask mask) {
  check_linear_args("linear_cross_entropy", input, weight, bias, target_, reduction, mask);
  TORCH_CHECK(label_smoothing <= 1.0, "linear_cross_entropy: label_smoothing must be <= 1, got ",
              label_smoothing);
  const at::Tensor target = target_.contiguous();
  Grads grads = empty_grads(input, weight, mask);
  at::Tensor loss = at::empty({}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_cross_entropy_cpu", [&] {
    // A linear layer has no class weights: the loss's `weight` stays None.
    const cpu::CrossEntropySetup<scalar_t> setup(target, std::nullopt, weight.size(0), ignore_index,
                                                 label_smoothing, reduction);
    const double total = linear_blocks_cpu<scalar_t, cpu::CrossEntropyMath>(
        input, weight, bias, target, setup.lane_targets.data(), setup.params, mask, grads);
    *loss.mutable_data_ptr<scalar_t>() = scalar_t(reduction == kMean ? total / setup.denom : total);
  });
  return {loss, grads.input, grads.weight, grads.bias};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_multi_margin_loss_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target_, int64_t p, double margin, int64_t reduction, Mask mask) {
  check_linear_args("linear_multi_margin_loss", input, weight, bias, target_, reduction, mask);
  TORCH_CHECK(p == 1 || p == 2, "linear_multi_margin_loss: only p == 1 and p == 2 supported, got ", p);
  const at::Tensor target = target_.contiguous();
  Grads grads = empty_grads(input, weight, mask);
  at::Tensor loss = at::empty({}, input.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "linear_multi_margin_loss_cpu", [&] {
    const cpu::MultiMarginSetup<scalar_t> setup(target, std::nullopt, weight.size(0), p, margin, reduction);
    const double total = linear_blocks_cpu<scalar_t, cpu::MultiMarginMath>(
        input, weight, bias, target, setup.lane_targets.data(), setup.params, mask, grads);
    *loss.mutable_data_ptr<scalar_t>() = scalar_t(reduction == kMean ? total / setup.denom : total);
  });
  return {loss, grads.input, grads.weight, grads.bias};
}

// ---- CUDA (composition of cuBLAS GEMMs and the CUDA loss ops) -----------------------

// The chunk's loss op is called through the dispatcher with reduction 'none', so that
// the chunk's gradient is unscaled (grad_output = 1 per row); the reduction's scale is
// applied here.  Scores stay in the input dtype (as in the unfused composition) so that
// the GEMMs run on the tensor cores; the loss op accumulates in float32 and the chunk's
// per-row losses are summed in float32.  A chunk holds up to 256 MiB of scores (and as
// much of their gradient): few large chunks, because each re-reads and re-writes dW.
int64_t device_block_rows(int64_t N, int64_t C, int64_t elem) {
  if (const int64_t o = g_block_rows_override.load()) return std::max<int64_t>(1, o);
  return std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(256) << 20) / std::max<int64_t>(1, C * elem)));
}

template <typename LossCall>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_chunks_device(
    const at::Tensor& X, const at::Tensor& W, const std::optional<at::Tensor>& b,
    const at::Tensor& target, int64_t reduction, const at::Tensor& denom, Mask mask,
    LossCall&& loss_call) {
  const int64_t N = X.size(0), C = W.size(0);
  const bool any_grad = mask[0] || mask[1] || mask[2];
  const auto acc_type = at::toOpMathType(X.scalar_type());
  Grads grads = empty_grads(X, W, mask);
  GradAccumulator acc(grads, mask, acc_type, /*gemm_in_input_dtype=*/true);
  const at::Tensor scale = reduction == kMean ? denom.reciprocal() : at::ones({}, denom.options());
  const int64_t BR = device_block_rows(N, C, X.element_size());
  const at::Tensor Wt = W.t();
  at::Tensor total = at::zeros({}, X.options().dtype(acc_type));
  for (int64_t r0 = 0; r0 < N; r0 += BR) {
    const int64_t n = std::min(BR, N - r0);
    const at::Tensor Xb = X.narrow(0, r0, n);
    at::Tensor S = b ? at::addmm(*b, Xb, Wt) : at::mm(Xb, Wt);
    auto [rows, dS] = loss_call(S, target.narrow(0, r0, n), any_grad);
    S.reset();  // the scores are consumed: free them before the GEMMs
    total.add_(rows.sum(at::IntArrayRef{0}, false, acc_type));
    if (any_grad) acc.add(dS.mul_(scale), Xb, W, r0);
  }
  acc.finish();
  const at::Tensor loss = (reduction == kMean ? total.div(denom) : total).to(X.scalar_type());
  return {loss, grads.input, grads.weight, grads.bias};
}

using LossSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                                   const std::optional<at::Tensor>&, int64_t,
                                                   double, int64_t, bool);
using MarginSig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                     double, const std::optional<at::Tensor>&,
                                                     int64_t, bool);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_device(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, int64_t reduction,
    Mask mask) {
  check_linear_args("linear_cross_entropy", input, weight, bias, target, reduction, mask);
  static const auto ce = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("linclass::cross_entropy", "")
                             .typed<LossSig>();
  const at::Tensor denom = target.ne(ignore_index).sum().to(at::toOpMathType(input.scalar_type()));
  return linear_chunks_device(input, weight, bias, target, reduction, denom, mask,
                              [&](const at::Tensor& S, const at::Tensor& t, bool grad) {
                                return ce.call(S, t, std::nullopt, ignore_index, label_smoothing,
                                               kNone, grad);
                              });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_multi_margin_loss_device(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t p, double margin, int64_t reduction, Mask mask) {
  check_linear_args("linear_multi_margin_loss", input, weight, bias, target, reduction, mask);
  static const auto mm = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("linclass::multi_margin_loss", "")
                             .typed<MarginSig>();
  const at::Tensor denom = at::full({}, double(input.size(0)), input.options().dtype(at::toOpMathType(input.scalar_type())));
  return linear_chunks_device(input, weight, bias, target, reduction, denom, mask,
                              [&](const at::Tensor& S, const at::Tensor& t, bool grad) {
                                return mm.call(S, t, p, margin, std::nullopt, kNone, grad);
                              });
}

}  // namespace

TORCH_LIBRARY_IMPL(linclass, CPU, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_cpu);
  m.impl("linear_multi_margin_loss", &linear_multi_margin_loss_cpu);
}

TORCH_LIBRARY_IMPL(linclass, CUDA, m) {
  m.impl("linear_cross_entropy", &linear_cross_entropy_device);
  m.impl("linear_multi_margin_loss", &linear_multi_margin_loss_device);
}

}  // namespace linclass
