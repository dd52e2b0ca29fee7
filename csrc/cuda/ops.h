// The CUDA entry points of linclass's ops, one file per op family beside this header;
// csrc/ops.cpp registers them for the CUDA dispatch key (builds with LINCLASS_WITH_CUDA).
#pragma once

#include "tensor_ops.h"

#include <array>
#include <tuple>

namespace linclass {

// cuda/cross_entropy.cu
std::tuple<Tensor, Tensor> cross_entropy_cuda(const Tensor& input, const Tensor& target,
                                              const OptTensor& weight, int64_t ignore_index,
                                              double label_smoothing, int64_t reduction,
                                              bool compute_grad);

// cuda/multi_margin.cu
std::tuple<Tensor, Tensor> multi_margin_loss_cuda(const Tensor& input, const Tensor& target,
                                                  int64_t p, double margin, const OptTensor& weight,
                                                  int64_t reduction, bool compute_grad);

// cuda/linear_loss.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_cuda(
    const Tensor& input, const Tensor& weight, const OptTensor& bias, const Tensor& target,
    int64_t ignore_index, double label_smoothing, int64_t reduction,
    std::array<bool, 3> output_mask);
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_multi_margin_loss_cuda(
    const Tensor& input, const Tensor& weight, const OptTensor& bias, const Tensor& target,
    int64_t p, double margin, int64_t reduction, std::array<bool, 3> output_mask);

}  // namespace linclass
