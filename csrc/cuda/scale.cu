// Backward of the fused ops on CUDA: the saved gradient (written by the forward for
// grad_output = 1) times grad_output, in place.  Every thread reads grad_output from
// device memory and returns when it is 1, so the host never waits for the GPU to learn
// it (the alternative, grad_output.item(), stalls the CPU once per step).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>

#include "scale.h"

namespace linclass::cuda {
namespace {

template <typename T>
__global__ void scale_kernel(T* __restrict__ grad, const T* __restrict__ grad_output, int64_t n) {
  using acc_t = at::opmath_type<T>;
  const acc_t s = static_cast<acc_t>(*grad_output);
  if (s == acc_t(1)) return;
  const int64_t step = int64_t(gridDim.x) * blockDim.x;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += step)
    grad[i] = static_cast<T>(static_cast<acc_t>(grad[i]) * s);
}

}  // namespace

void scale_inplace(const at::Tensor& grad, const at::Tensor& grad_output) {
  TORCH_CHECK(grad_output.numel() == 1, "linclass: scale_inplace needs a one-element grad_output");
  const int64_t n = grad.numel();
  if (n == 0) return;
  if (!grad.is_contiguous()) {  // rare (a transposed input's gradient): a torch multiply
    grad.mul_(grad_output.to(grad.scalar_type()));
    return;
  }
  const at::cuda::CUDAGuard guard(grad.device());
  const at::Tensor go = grad_output.to(grad.device(), grad.scalar_type());
  constexpr int kThreads = 256;
  const int blocks = static_cast<int>(std::min<int64_t>((n + kThreads - 1) / kThreads, 4096));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_inplace", [&] {
    scale_kernel<scalar_t><<<blocks, kThreads, 0, stream>>>(grad.data_ptr<scalar_t>(),
                                                           go.data_ptr<scalar_t>(), n);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace linclass::cuda
