// Per-row losses -> the op's 'sum' / 'mean' loss in one launch (see reduce.h).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cub/block/block_reduce.cuh>

#include "reduce.h"

namespace linclass::cuda {
namespace {

constexpr int kThreads = 512;
// One block streams the rows alone, on one SM (~0.1 TB/s at best): past this many
// (256 KiB of float32, a few microseconds there) at::sum's grid-wide reduction, which
// costs two more launches, is the faster choice.  An estimate, not a measured
// crossover; 65536 rows (the benchmarks' small-C shape) still take the one launch.
constexpr int64_t kMaxRows = int64_t(1) << 16;

template <typename acc_t, typename out_t>
__global__ void reduce_rows_kernel(const acc_t* __restrict__ rows, int64_t n,
                                   const acc_t* __restrict__ divisor_dev, acc_t divisor_host,
                                   out_t* __restrict__ out) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  acc_t v = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) v += rows[i];
  const acc_t total = Reduce(tmp).Sum(v);
  // 0 / 0 = NaN for a 'mean' over no rows, as torch gives.
  if (threadIdx.x == 0) out[0] = static_cast<out_t>(total / (divisor_dev ? *divisor_dev : divisor_host));
}

}  // namespace

at::Tensor reduce_rows(const at::Tensor& loss_rows, const at::Tensor* divisor_dev, double divisor_host,
                       at::ScalarType out_type) {
  const int64_t n = loss_rows.numel();
  if (n > kMaxRows) {
    at::Tensor total = loss_rows.sum();
    // divisor_dev is a one-element slice (shape [1]): divide by it as a 0-dim tensor, or
    // the loss would come back with shape [1] instead of torch's [].
    total = divisor_dev ? total.div(divisor_dev->reshape(at::IntArrayRef{})) : total.div(divisor_host);
    return total.to(out_type);
  }
  const c10::cuda::CUDAGuard guard(loss_rows.device());
  at::Tensor out = at::empty({}, loss_rows.options().dtype(out_type));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_type, "reduce_rows", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    TORCH_CHECK(loss_rows.scalar_type() == c10::CppTypeToScalarType<acc_t>::value,
                "linclass: reduce_rows expects per-row losses in ", c10::toString(c10::CppTypeToScalarType<acc_t>::value));
    reduce_rows_kernel<acc_t, scalar_t><<<1, kThreads, 0, stream>>>(
        loss_rows.const_data_ptr<acc_t>(), n, divisor_dev ? divisor_dev->const_data_ptr<acc_t>() : nullptr,
        static_cast<acc_t>(divisor_host), out.mutable_data_ptr<scalar_t>());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace linclass::cuda
