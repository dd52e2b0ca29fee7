// Host-side pieces shared by every loss op (CPU and CUDA): how an input is seen as
// rows x classes, the reduction codes, and the checks every op makes before it
// touches memory.
#pragma once

#include "tensor_ops.h"

#include <cstdint>
#include <optional>
#include <utility>

namespace linclass {

// Same codes as torch's Reduction enum, so Python passes torch's enum values straight through.
enum Reduction : int64_t { kNone = 0, kMean = 1, kSum = 2 };

// A class-index loss sees its input as `rows` rows of `classes` scores.  Inputs are
// (C,), (N, C) or (N, C, d1, ..., dk); for the last one the d-dims are flattened into
// `inner` so that row r = (n, k) with n = r / inner, k = r % inner, and
//   score(r, j) = data[n * stride_n + k * stride_k + j * stride_c].
// Keeping the strides (instead of moving the class dim last with a copy) lets
// transposed and K-dimensional inputs reach the kernels without an extra N x C buffer.
struct RowGeometry {
  int64_t outer = 1, classes = 1, inner = 1;
  int64_t stride_n = 0, stride_c = 1, stride_k = 0;

  int64_t rows() const { return outer * inner; }
  int64_t offset(int64_t r) const {
    return inner == 1 ? r * stride_n : (r / inner) * stride_n + (r % inner) * stride_k;
  }
  bool rows_contiguous() const { return stride_c == 1; }
};

// Geometry of `t`, whose class dim is dim 0 for 1-D tensors and dim 1 otherwise.
// Returns nullopt when the d-dims cannot be flattened into one strided dim (then the
// caller makes the input contiguous first).
std::optional<RowGeometry> row_geometry(const Tensor& t);

// Shape/dtype checks shared by the CPU and CUDA entry points.  The Python wrappers
// check the same things with torch's wording first; these keep a direct
// torch.ops.linclass call from ever reaching a kernel with inconsistent arguments.
void check_class_index_args(const char* op, const Tensor& input, const Tensor& target,
                            const OptTensor& weight, int64_t reduction);

// The argument checks of each op, shared by its CPU and CUDA entry points.
void check_cross_entropy_args(const Tensor& input, const Tensor& target,
                              const OptTensor& weight, double label_smoothing,
                              int64_t reduction);
// cross_entropy_probs: input (C,), (N, C) or (N, C, d1, ..., dk), a probability target
// of the same shape and dtype.
void check_cross_entropy_probs_args(const Tensor& input, const Tensor& target,
                                    const OptTensor& weight, double label_smoothing,
                                    int64_t reduction);
void check_multi_margin_args(const Tensor& input, const Tensor& target, int64_t p,
                             const OptTensor& weight, int64_t reduction);

// `input` (copied to contiguous only when its d-dims cannot be flattened) and its geometry.
std::pair<Tensor, RowGeometry> rows_of(const Tensor& input);

// Loss output for the given reduction: target-shaped for 'none', a 0-dim tensor otherwise;
// in the accumulation dtype (float32 for 16-bit inputs), which the ops return their loss
// in (the Python functions round it to torch's loss dtype: linclass/functional.py).
Tensor empty_loss(const Tensor& input, const Tensor& target, int64_t reduction);

}  // namespace linclass
