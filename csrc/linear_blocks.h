// Host logic shared by the CPU and CUDA fused linear + loss ops (cpu/linear_loss.cpp,
// cuda/linear_loss.cpp): their argument checks, the gradient outputs, and the
// accumulation of dW and db over blocks of rows.
//
// Both run loss(X W^T + b, y) a block of rows at a time, so the N x C scores never
// exist:  S = X_b W^T + b;  the fused loss kernel turns S into dS;  dX_b = dS W,
// dW += dS^T X_b,  db += column sums of dS.  Blocks run in order and every sum adds
// them in order, so results do not depend on the thread count.  Only 'mean' and 'sum'
// are fused: with 'none' the gradients depend on a per-row grad_output that does not
// exist yet (linclass/_linear_blocks.py then runs the blocks in Python, the scores made
// again in backward).
#pragma once


#include "tensor_ops.h"

#include <array>
#include <cstdint>
#include <optional>

namespace linclass {

using Mask = std::array<bool, 3>;  // gradients wanted for (input, weight, bias)

// Rows per block forced by a test (linclass::_linear_block_rows; 0 = automatic).
int64_t linear_block_rows_override();

void check_linear_args(const char* op, const Tensor& input, const Tensor& weight,
                       const OptTensor& bias, const Tensor& target,
                       int64_t reduction, const Mask& mask);

struct Grads {
  Tensor input, weight, bias;
};

// The gradient outputs the mask asks for (an empty tensor for the others); on the CPU
// the input's gradient has the input's strides where the input is dense.
Grads empty_grads(const Tensor& input, const Tensor& weight, const Mask& mask);

// Whether this CPU multiplies 16-bit floats natively (bfloat16: AVX512-BF16 or AMX-BF16;
// float16: AMX-FP16), so that the BLAS's product in that dtype (as F.linear's backward
// computes it) beats a float32 product of converted operands.  Elsewhere a 16-bit
// product is emulated, slower than float32 or far slower (bench/results/linear-16bit.md).
bool cpu_multiplies_16bit(bool bf16);

// Whether this is an Intel CPU (cpuid's vendor string).  torch's BLAS on x86 is MKL,
// whose kernels for the fused linear ops' skinny products (C x D and N x C) are fast on
// Intel's cores and several times slower on others, so the register-blocked products
// (small_gemm.h) beat it to 64 classes on an AMD EPYC but only to 11 on an Intel Xeon
// (bench/results/linear-gemm-floor.md).
bool cpu_is_intel();

// out = a @ b (+ bias, one value per column), or out += a @ b with `accumulate`: one of
// a block's products.  Float32 products on the CPU go through oneDNN where
// linclass_linear_onednn() says so (off Intel, where MKL's kernels for these shapes run
// well below oneDNN's, bench/results/linear-gemm-floor.md) and the product has
// at least kOneDnnMinWork multiply-adds (below, oneDNN's fixed cost per call exceeds what
// it saves); its results, at most kOneDnnOutBytes a call, are copied into out.  The rest
// take the BLAS, in place.
constexpr int64_t kOneDnnMinWork = int64_t(1) << 22;
constexpr int64_t kOneDnnOutBytes = int64_t(4) << 20;
void block_product(const Tensor& out, const Tensor& a, const Tensor& b,
                   const OptTensor& bias = std::nullopt, bool accumulate = false);

// Accumulates dW, db over blocks in block order; db in acc_type.  dW:
//  - float32/64: every block's product added into the output;
//  - 16-bit on the GPU (`gemm_in_input_dtype`: a float32 copy would turn the tensor-core
//    GEMMs into float32 ones): each block's product in the input dtype, added in it
//    (cuBLAS accumulates in float32 and rounds once per block);
//  - 16-bit on a CPU that multiplies that dtype natively (linclass_linear_16bit_products):
//    each block's product in the input dtype (float32 accumulation in the BLAS, one
//    rounding), summed in float32; one block (most inputs up to ~1000 rows) is then
//    exactly F.linear's backward, several round once more per block;
//  - 16-bit elsewhere: each block's operands converted, the products summed in float32,
//    one rounding in all (and the scores and dX made in float32 too: add_in_float32).
class GradAccumulator {
 public:
  // total_rows: the rows of all blocks (-1: unknown).
  GradAccumulator(Grads& g, const Mask& mask, ScalarType acc_type, bool gemm_in_input_dtype = false,
                  int64_t total_rows = -1)
      : g_(g), mask_(mask), acc_type_(acc_type),
        low_(g.input.scalar_type() != acc_type && !gemm_in_input_dtype),
        products_in_input_dtype_(low_ && g.input.is_cpu() &&
                                 native_16bit_products(g.input.scalar_type())),
        total_rows_(total_rows) {}

  // The block of rows starting at r0: its score gradient dS and inputs Xb; W is (C, D).
  void add(const Tensor& dS, const Tensor& Xb, const Tensor& W, int64_t r0);
  // Whether 16-bit inputs on the CPU should have all three products in float32 from
  // converted operands (add_in_float32): where the CPU only emulates products in their
  // dtype (float16 without AMX-FP16, bfloat16 without AVX512-BF16 or AMX-BF16), a 16-bit
  // product runs far slower than a float32 one (bench/results/linear-16bit.md).
  bool widens_products() const { return low_ && !products_in_input_dtype_ && g_.input.is_cpu(); }
  // add() for widens_products(): dS (16-bit) is widened into dSf (float32, the block's
  // shape), Xf and Wf are the block's and the weight's float32 copies; dX is rounded once
  // into its rows, as a 16-bit product rounds its float32 sums.
  void add_in_float32(const Tensor& dS, const Tensor& dSf, const Tensor& Xf, const Tensor& Wf, int64_t r0);
  // Writes dW and db into the gradient outputs (zeros when there were no rows).
  void finish();

 private:
  static bool native_16bit_products(ScalarType dtype);
  void add_weight_grad(const Tensor& dS, const Tensor& Xb, int64_t r0);
  void add_bias(const Tensor& dS);

  Grads& g_;
  Mask mask_;
  ScalarType acc_type_;
  bool low_, products_in_input_dtype_, started_ = false;
  int64_t total_rows_;
  Tensor dW_, db_;
};

}  // namespace linclass
