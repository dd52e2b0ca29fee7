// linclass::linear_cross_entropy and ::linear_multi_margin_loss on CUDA: the blocks of
// linear_blocks.h as cuBLAS GEMMs around the CUDA loss ops (cross_entropy.cu,
// multi_margin.cu), called through the dispatcher.
#include "cuda/ops.h"

#include "common.h"
#include "linear_blocks.h"

#include <ATen/OpMathType.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/full.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/ones.h>
#include <ATen/ops/zeros.h>

namespace linclass {
namespace {

// The chunk's loss op is called through the dispatcher with reduction 'none', so that
// the chunk's gradient is unscaled (grad_output = 1 per row); the reduction's scale is
// applied here.  Scores stay in the input dtype (as in the unfused composition) so that
// the GEMMs run on the tensor cores; the loss op accumulates in float32 and the chunk's
// per-row losses are summed in float32.  A chunk holds up to 256 MiB of scores (and as
// much of their gradient): few large chunks, because each re-reads and re-writes dW.
int64_t device_block_rows(int64_t N, int64_t C, int64_t elem) {
  if (const int64_t o = linear_block_rows_override()) return std::max<int64_t>(1, o);
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

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, int64_t reduction,
    Mask mask) {
  check_linear_args("linear_cross_entropy", input, weight, bias, target, reduction, mask);
  static const auto ce_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("linclass::cross_entropy", "")
                             .typed<LossSig>();
  const at::Tensor denom = target.ne(ignore_index).sum().to(at::toOpMathType(input.scalar_type()));
  return linear_chunks_device(input, weight, bias, target, reduction, denom, mask,
                              [&](const at::Tensor& S, const at::Tensor& t, bool grad) {
                                return ce_op.call(S, t, std::nullopt, ignore_index, label_smoothing,
                                               kNone, grad);
                              });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_multi_margin_loss_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t p, double margin, int64_t reduction, Mask mask) {
  check_linear_args("linear_multi_margin_loss", input, weight, bias, target, reduction, mask);
  static const auto margin_op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("linclass::multi_margin_loss", "")
                             .typed<MarginSig>();
  const at::Tensor denom = at::full({}, double(input.size(0)), input.options().dtype(at::toOpMathType(input.scalar_type())));
  return linear_chunks_device(input, weight, bias, target, reduction, denom, mask,
                              [&](const at::Tensor& S, const at::Tensor& t, bool grad) {
                                return margin_op.call(S, t, p, margin, std::nullopt, kNone, grad);
                              });
}

}  // namespace linclass
