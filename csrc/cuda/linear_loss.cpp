// linclass::linear_cross_entropy and ::linear_multi_margin_loss on CUDA: the blocks of
// linear_blocks.h as cuBLAS GEMMs around the CUDA loss ops (cross_entropy.cu,
// multi_margin.cu), called directly.
#include "cuda/ops.h"

#include "common.h"
#include "linear_blocks.h"

#include <algorithm>

namespace linclass {
namespace {

// The chunk's loss op is called with reduction 'none', so that the chunk's gradient is
// unscaled (grad_output = 1 per row); the reduction's scale is applied here.  Scores
// stay in the input dtype (as in the unfused composition) so that the GEMMs run on the
// tensor cores; the loss op accumulates in float32 and the chunk's per-row losses are
// summed in float32.  A chunk holds up to 256 MiB of scores (and as much of their
// gradient): few large chunks, because each re-reads and re-writes dW.
//
// The stable ABI's dispatcher call takes no Scalar arguments, so no op here has one:
// the scores are aten::linear (aten::addmm(b, X, W^T) with a bias, aten::mm without),
// and the running total adds with tensor_ops.h's `added`.
int64_t device_block_rows(int64_t N, int64_t C, int64_t elem) {
  if (const int64_t o = linear_block_rows_override()) return std::max<int64_t>(1, o);
  return std::max<int64_t>(1, std::min<int64_t>(N, (int64_t(256) << 20) / std::max<int64_t>(1, C * elem)));
}

template <typename LossCall>
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_chunks_device(
    const Tensor& X, const Tensor& W, const OptTensor& b, const Tensor& target,
    int64_t reduction, const Tensor& denom, Mask mask, LossCall&& loss_call) {
  const int64_t N = X.size(0), C = W.size(0);
  const bool any_grad = mask[0] || mask[1] || mask[2];
  const ScalarType acc = acc_scalar_type(X.scalar_type());
  Grads grads = empty_grads(X, W, mask);
  GradAccumulator accum(grads, mask, acc, /*gemm_in_input_dtype=*/true);
  const Tensor scale = reduction == kMean ? call_aten("aten::reciprocal", "", denom)
                                          : torch::stable::full({}, 1.0, denom.scalar_type(),
                                                                std::nullopt, denom.device());
  const int64_t BR = device_block_rows(N, C, int64_t(X.element_size()));
  const int64_t dim0[1] = {0};
  Tensor total = torch::stable::new_zeros(X, {}, acc);
  for (int64_t r0 = 0; r0 < N; r0 += BR) {
    const int64_t n = std::min(BR, N - r0);
    const Tensor Xb = narrowed(X, 0, r0, n);
    Tensor S = call_aten("aten::linear", "", Xb, W, b);
    auto [rows, dS] = loss_call(S, narrowed(target, 0, r0, n), any_grad);
    S = Tensor();  // the scores are consumed: free them before the GEMMs
    total = added(total, torch::stable::sum(rows, IntList(dim0, 1), false, acc));
    if (any_grad) {
      mul_(dS, scale);
      accum.add(dS, Xb, W, r0);
    }
  }
  accum.finish();
  const Tensor loss = reduction == kMean ? call_aten("aten::div", "Tensor", total, denom) : total;
  return {loss, grads.input, grads.weight, grads.bias};
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_cuda(
    const Tensor& input, const Tensor& weight, const OptTensor& bias, const Tensor& target,
    int64_t ignore_index, double label_smoothing, int64_t reduction, Mask mask) {
  check_linear_args("linear_cross_entropy", input, weight, bias, target, reduction, mask);
  // The 'mean' denominator: the count of targets that are not ignore_index, compared
  // with a 0-dim CPU tensor (exact for every int64, as aten::ne.Scalar).
  Tensor ignore = empty_cpu({}, ScalarType::Long);
  *ignore.mutable_data_ptr<int64_t>() = ignore_index;
  const Tensor denom = to_dtype(torch::stable::sum(call_aten("aten::ne", "Tensor", target, ignore)),
                                acc_scalar_type(input.scalar_type()));
  return linear_chunks_device(input, weight, bias, target, reduction, denom, mask,
                              [&](const Tensor& S, const Tensor& t, bool grad) {
                                return cross_entropy_cuda(S, t, std::nullopt, ignore_index,
                                                          label_smoothing, kNone, grad);
                              });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_multi_margin_loss_cuda(
    const Tensor& input, const Tensor& weight, const OptTensor& bias, const Tensor& target,
    int64_t p, double margin, int64_t reduction, Mask mask) {
  check_linear_args("linear_multi_margin_loss", input, weight, bias, target, reduction, mask);
  const Tensor denom = torch::stable::full({}, double(input.size(0)), acc_scalar_type(input.scalar_type()),
                                           std::nullopt, input.device());
  return linear_chunks_device(input, weight, bias, target, reduction, denom, mask,
                              [&](const Tensor& S, const Tensor& t, bool grad) {
                                return multi_margin_loss_cuda(S, t, p, margin, std::nullopt, kNone, grad);
                              });
}

}  // namespace linclass
