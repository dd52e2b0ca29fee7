// Host logic shared by the CPU and CUDA fused linear + loss ops (cpu/linear_loss.cpp,
// cuda/linear_loss.cpp): their argument checks, the gradient outputs, and the
// accumulation of dW and db over blocks of rows.
//
// Both run loss(X W^T + b, y) a block of rows at a time, so the N x C scores never
// exist:  S = X_b W^T + b;  the fused loss kernel turns S into dS;  dX_b = dS W,
// dW += dS^T X_b,  db += column sums of dS.  Blocks run in order and every sum adds
// them in order, so results do not depend on the thread count.  Only 'mean' and 'sum'
// are fused: with 'none' the gradients depend on a per-row grad_output that does not
// exist yet (linclass.functional then composes linear + fused loss).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>

#include <array>
#include <cstdint>
#include <optional>

namespace linclass {

using Mask = std::array<bool, 3>;  // gradients wanted for (input, weight, bias)

// Rows per block forced by a test (linclass::_linear_block_rows; 0 = automatic).
int64_t linear_block_rows_override();
// Sets that override; returns the old value.
int64_t set_linear_block_rows(int64_t rows);

void check_linear_args(const char* op, const at::Tensor& input, const at::Tensor& weight,
                       const std::optional<at::Tensor>& bias, const at::Tensor& target,
                       int64_t reduction, const Mask& mask);

struct Grads {
  at::Tensor input, weight, bias;
};

// The gradient outputs the mask asks for (an empty tensor for the others).
Grads empty_grads(const at::Tensor& input, const at::Tensor& weight, const Mask& mask);

// Accumulates dW, db over blocks in block order; db in acc_type, dW too unless
// `gemm_in_input_dtype` (the GPU: a float32 copy would turn the tensor-core GEMMs into
// float32 ones; cuBLAS accumulates each block's product in float32 and rounds once per
// block).
class GradAccumulator {
 public:
  GradAccumulator(Grads& g, const Mask& mask, at::ScalarType acc_type, bool gemm_in_input_dtype = false)
      : g_(g), mask_(mask), acc_type_(acc_type),
        low_(g.input.scalar_type() != acc_type && !gemm_in_input_dtype) {}

  // The block of rows starting at r0: its score gradient dS and inputs Xb; W is (C, D).
  void add(const at::Tensor& dS, const at::Tensor& Xb, const at::Tensor& W, int64_t r0);
  // Writes dW and db into the gradient outputs (zeros when there were no rows).
  void finish();

 private:
  Grads& g_;
  Mask mask_;
  at::ScalarType acc_type_;
  bool low_, started_ = false;
  at::Tensor dW_, db_;
};

}  // namespace linclass
