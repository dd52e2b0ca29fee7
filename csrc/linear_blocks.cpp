#include "linear_blocks.h"

#include "common.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <c10/util/Exception.h>

#include <atomic>

namespace linclass {
namespace {
std::atomic<int64_t> g_block_rows_override{0};
}  // namespace

int64_t linear_block_rows_override() { return g_block_rows_override.load(); }

int64_t set_linear_block_rows(int64_t rows) { return g_block_rows_override.exchange(rows); }

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

Grads empty_grads(const at::Tensor& input, const at::Tensor& weight, const Mask& mask) {
  const auto opts = input.options();
  return {mask[0] ? at::empty(input.sizes(), opts) : at::empty({0}, opts),
          mask[1] ? at::empty({weight.size(0), weight.size(1)}, opts) : at::empty({0}, opts),
          mask[2] ? at::empty({weight.size(0)}, opts) : at::empty({0}, opts)};
}

void GradAccumulator::add(const at::Tensor& dS, const at::Tensor& Xb, const at::Tensor& W, int64_t r0) {
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

void GradAccumulator::finish() {
  if (mask_[1] && !started_) g_.weight.zero_();  // no rows
  if (mask_[1] && dW_.defined()) g_.weight.copy_(dW_);
  if (mask_[2]) {
    if (db_.defined()) g_.bias.copy_(db_);
    else g_.bias.zero_();
  }
}

}  // namespace linclass
