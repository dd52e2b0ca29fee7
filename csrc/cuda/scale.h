// In-place rescale of a saved gradient by grad_output without a host synchronization
// (the CUDA twin of kernels/scale.py; called by rescale in csrc/autograd.cpp).
#pragma once

#include <ATen/core/Tensor.h>

namespace linclass::cuda {

// grad *= grad_output (one element, on grad's device), skipped on the device when
// grad_output == 1: no memory traffic in the common case of loss.backward().
void scale_inplace(const at::Tensor& grad, const at::Tensor& grad_output);

}  // namespace linclass::cuda
