// The CUDA entry points of linclass's ops, one file per op family beside this header;
// csrc/ops.cpp registers them for the CUDA dispatch key (builds with LINCLASS_WITH_CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace linclass {

// cuda/cross_entropy.cu
std::tuple<at::Tensor, at::Tensor> cross_entropy_cuda(const at::Tensor& input, const at::Tensor& target,
                                                      const std::optional<at::Tensor>& weight,
                                                      int64_t ignore_index, double label_smoothing,
                                                      int64_t reduction, bool compute_grad);

// cuda/multi_margin.cu
std::tuple<at::Tensor, at::Tensor> multi_margin_loss_cuda(const at::Tensor& input, const at::Tensor& target,
                                                          int64_t p, double margin,
                                                          const std::optional<at::Tensor>& weight,
                                                          int64_t reduction, bool compute_grad);

// cuda/linear_loss.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, int64_t reduction,
    std::array<bool, 3> output_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_multi_margin_loss_cuda(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t p, double margin, int64_t reduction,
    std::array<bool, 3> output_mask);

}  // namespace linclass
