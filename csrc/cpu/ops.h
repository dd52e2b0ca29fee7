// The CPU entry points of linclass's ops, one file per op family beside this header;
// csrc/ops.cpp registers them for the CPU dispatch key.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

namespace linclass {

// cpu/cross_entropy.cpp
std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& input, const at::Tensor& target,
                                                     const std::optional<at::Tensor>& weight,
                                                     int64_t ignore_index, double label_smoothing,
                                                     int64_t reduction, bool compute_grad);

// cpu/multi_margin.cpp
std::tuple<at::Tensor, at::Tensor> multi_margin_loss_cpu(const at::Tensor& input, const at::Tensor& target,
                                                         int64_t p, double margin,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t reduction, bool compute_grad);

// cpu/linear_loss.cpp
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t ignore_index, double label_smoothing, int64_t reduction,
    std::array<bool, 3> output_mask);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_multi_margin_loss_cpu(
    const at::Tensor& input, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const at::Tensor& target, int64_t p, double margin, int64_t reduction,
    std::array<bool, 3> output_mask);

// cpu/linear_sgd.cpp
double linear_sgd_step(const at::Tensor& input, at::Tensor& weight, const at::Tensor& target,
                       const at::Tensor& index, int64_t loss, double learning_rate, double reg);
void linear_sgd_sweep_step(const at::Tensor& input, at::Tensor& weight, const at::Tensor& target,
                           const at::Tensor& index, int64_t loss, int64_t runs,
                           const at::Tensor& decay, const at::Tensor& grad_scale);

}  // namespace linclass
