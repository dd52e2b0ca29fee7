#include "linear_blocks.h"

#include "buffer_cache.h"
#include "common.h"
#include "shared_state.h"

#include <atomic>

namespace linclass {
int64_t linear_block_rows_override() { return linclass_linear_block_rows(); }

void check_linear_args(const char* op, const Tensor& input, const Tensor& weight,
                       const OptTensor& bias, const Tensor& target,
                       int64_t reduction, const Mask& mask) {
  LINCLASS_CHECK(input.dim() == 2, op, ": input must be (N, D), got ", shape_string(input.sizes()));
  LINCLASS_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": weight must be (C, D) with D = ", input.size(1), ", got ", shape_string(weight.sizes()));
  LINCLASS_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " does not match input dtype ", input.scalar_type());
  LINCLASS_CHECK(same_device(weight, input), op, ": weight and input are on different devices");
  if (bias) {
    LINCLASS_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be (C,) with C = ", weight.size(0), ", got ", shape_string(bias->sizes()));
    LINCLASS_CHECK(bias->scalar_type() == input.scalar_type() && same_device(*bias, input),
                op, ": bias must have the input's dtype and device");
  }
  LINCLASS_CHECK(!mask[2] || bias, op, ": a bias gradient was asked for without a bias");
  LINCLASS_CHECK(target.dim() == 1 && target.size(0) == input.size(0), op,
              ": target must be (N,) with N = ", input.size(0), ", got ", shape_string(target.sizes()));
  LINCLASS_CHECK(target.scalar_type() == ScalarType::Long, op, ": target must be int64, got ",
              target.scalar_type());
  LINCLASS_CHECK(reduction == kMean || reduction == kSum, op,
              ": only 'mean' and 'sum' are fused (got reduction code ", reduction, ")");
}

namespace {
// A gradient output like `input`: on the CPU from the buffer cache, since dW of a
// 128256 x 1024 head is 0.5 GB, whose page faults cost more than the whole step when
// it is freshly allocated each call (buffer_cache.h).
Tensor empty_grad(IntList sizes, const Tensor& input) {
  return input.is_cpu() ? empty_cached(sizes, input.scalar_type()) : empty(sizes, input);
}

// The input's gradient: on the CPU in the input's strides where they are dense (a
// column-major x.t()), as the fused losses' gradients (empty_cached_like).
Tensor empty_input_grad(const Tensor& input) {
  return input.is_cpu() ? empty_cached_like(input) : empty(input.sizes(), input);
}
}  // namespace

Grads empty_grads(const Tensor& input, const Tensor& weight, const Mask& mask) {
  return {mask[0] ? empty_input_grad(input) : empty_none(input),
          mask[1] ? empty_grad({weight.size(0), weight.size(1)}, input) : empty_none(input),
          mask[2] ? empty({weight.size(0)}, input) : empty_none(input)};
}

void GradAccumulator::add(const Tensor& dS, const Tensor& Xb, const Tensor& W, int64_t r0) {
  if (mask_[0]) {
    Tensor rows = narrowed(g_.input, 0, r0, dS.size(0));
    mm_out(rows, dS, W);
  }
  if (mask_[1]) {
    // float32/64 accumulate straight into the output; low precision in a float32 copy,
    // except when this one block holds every row: then one product in the input dtype
    // (the BLAS accumulates it in float32 and rounds once, as F.linear's backward does)
    // is as exact and, with 16-bit dot-product instructions, twice as fast.
    if (low_ && !started_ && r0 == 0 && dS.size(0) == total_rows_) {
      mm_out(g_.weight, transposed(dS), Xb);
      started_ = true;
      return add_bias(dS);
    }
    const Tensor dSt = low_ ? to_dtype(transposed(dS), acc_type_) : transposed(dS);
    const Tensor X = low_ ? to_dtype(Xb, acc_type_) : Xb;
    if (!started_) {
      if (low_)
        dW_ = mm(dSt, X);  // the first block; later ones accumulate
      else
        mm_out(g_.weight, dSt, X);
      started_ = true;
    } else {
      addmm_(low_ ? dW_ : g_.weight, dSt, X);
    }
  }
  add_bias(dS);
}

void GradAccumulator::add_bias(const Tensor& dS) {
  if (mask_[2]) {
    const Tensor sums = sum_rows(to_dtype(dS, acc_type_));
    db_ = db_.defined() ? added(db_, sums) : sums;
  }
}

void GradAccumulator::finish() {
  if (mask_[1] && !started_) fill_zero(g_.weight);  // no rows
  if (mask_[1] && dW_.defined()) copy_into(g_.weight, dW_);
  if (mask_[2]) {
    if (db_.defined()) copy_into(g_.bias, db_);
    else fill_zero(g_.bias);
  }
}

}  // namespace linclass
