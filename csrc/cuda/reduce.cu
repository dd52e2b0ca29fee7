// Per-row losses -> the op's 'sum' / 'mean' loss in one launch (see reduce.h).
#include <cub/block/block_reduce.cuh>

#include "reduce.h"
#include "stable_cuda.h"

namespace linclass::cuda {
namespace {

constexpr int kThreads = 512;
// One block streams the rows alone, on one SM (~0.1 TB/s at best): past this many
// (256 KiB of float32, a few microseconds there) aten::sum's grid-wide reduction, which
// costs two more launches, is the faster choice.  An estimate, not a measured
// crossover; 65536 rows (the benchmarks' small-C shape) still take the one launch.
constexpr int64_t kMaxRows = int64_t(1) << 16;

template <typename acc_t>
__global__ void reduce_rows_kernel(const acc_t* __restrict__ rows, int64_t n,
                                   const acc_t* __restrict__ divisor_dev, acc_t divisor_host,
                                   acc_t* __restrict__ out) {
  using Reduce = cub::BlockReduce<acc_t, kThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  acc_t v = 0;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) v += rows[i];
  const acc_t total = Reduce(tmp).Sum(v);
  // 0 / 0 = NaN for a 'mean' over no rows, as torch gives.
  if (threadIdx.x == 0) out[0] = total / (divisor_dev ? *divisor_dev : divisor_host);
}

}  // namespace

Tensor reduce_rows(const Tensor& loss_rows, const Tensor* divisor_dev, double divisor_host) {
  const ScalarType acc = loss_rows.scalar_type();
  LINCLASS_CHECK(acc == ScalarType::Float || acc == ScalarType::Double,
                 "linclass: reduce_rows expects per-row losses in float32 or float64, got ", acc);
  const int64_t n = loss_rows.numel();
  if (n > kMaxRows) {
    const Tensor total = torch::stable::sum(loss_rows);
    // divisor_dev is a one-element slice (shape [1]): divide by it as a 0-dim tensor, or
    // the loss would come back with shape [1] instead of torch's [].  divisor_host goes
    // in as a 0-dim CPU tensor of the sum's dtype, which is what aten::div.Scalar makes
    // of its Scalar (the stable dispatcher call takes no Scalar arguments).
    const Tensor divisor = divisor_dev ? torch::stable::reshape(*divisor_dev, {})
                                       : torch::stable::full({}, divisor_host, acc);
    return call_aten("aten::div", "Tensor", total, divisor);
  }
  const DeviceGuard guard(loss_rows.get_device_index());
  const Tensor out = empty({}, loss_rows);
  const cudaStream_t stream = current_stream(loss_rows);
  LINCLASS_DISPATCH_FLOAT_DOUBLE(acc, "reduce_rows", [&] {
    reduce_rows_kernel<scalar_t><<<1, kThreads, 0, stream>>>(
        loss_rows.const_data_ptr<scalar_t>(), n,
        divisor_dev ? divisor_dev->const_data_ptr<scalar_t>() : nullptr,
        static_cast<scalar_t>(divisor_host), out.mutable_data_ptr<scalar_t>());
  });
  check_launch();
  return out;
}

}  // namespace linclass::cuda
