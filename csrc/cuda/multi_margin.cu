// linclass::multi_margin_loss on CUDA: the fused multi-class hinge (loss and d loss /
// d scores in one launch), mirroring multi_margin.cpp.  The math is the one in
// cpu/multi_margin.h:
//
//   z_j  = M - x_y + x_j                                    (j != y)
//   loss = (w_y / C) sum_{j != y} max(0, z_j)^p
//   dx_j = scale (w_y / C) [z_j > 0] (p == 1 ? 1 : 2 z_j),   dx_y = -sum_{j != y} dx_j
//
// A group of TPR threads takes one row: a pass for the sums (reduced across the group),
// a pass for the gradient.  A target outside [0, C) gives its row a NaN loss and NaN
// gradient; nothing is read or written out of bounds.
#include "cuda/ops.h"

#include "common.cuh"
#include "reduce.h"

namespace linclass {
namespace cuda {

// h = max(0, z)^P and dh/dz, counting a term only where z > 0 (as torch).
template <int P, typename T>
__device__ __forceinline__ void hinge(T z, T& h, T& d) {
  const T zp = z > T(0) ? z : T(0);
  h = P == 1 ? zp : zp * zp;
  d = P == 1 ? (z > T(0) ? T(1) : T(0)) : zp + zp;
}

template <typename scalar_t, typename acc_t, int TPR, int P, bool kGrad, bool kWeight>
__global__ void multi_margin_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ g,
                                    const int64_t* __restrict__ target,
                                    const scalar_t* __restrict__ weight,
                                    acc_t* __restrict__ loss_rows, int64_t rows, int64_t C,
                                    int64_t sxn, int64_t sxc, acc_t margin, acc_t scale) {
  __shared__ acc_t smem[32];
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / TPR) + threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  if (row >= rows) return;
  const int64_t y = target[row];
  const scalar_t* xr = x + row * sxn;
  scalar_t* gr = kGrad ? g + row * C : nullptr;
  if (y < 0 || y >= C) {
    if constexpr (kGrad)
      for (int64_t j = lane; j < C; j += TPR) gr[j] = scalar_t(nan_value<acc_t>());
    if (lane == 0) loss_rows[row] = nan_value<acc_t>();
    return;
  }
  const acc_t c = margin - acc_t(xr[y * sxc]);
  const acc_t w_over_c = (kWeight ? acc_t(weight[y]) : acc_t(1)) / acc_t(C);
  acc_t sum_h = 0, sum_d = 0;
  for (int64_t j = lane; j < C; j += TPR) {
    if (j == y) continue;
    acc_t h, d;
    hinge<P>(c + acc_t(xr[j * sxc]), h, d);
    sum_h += h;
    sum_d += d;
  }
  sum_h = group_reduce<TPR>(sum_h, SumOp(), smem);
  sum_d = group_reduce<TPR>(sum_d, SumOp(), smem);
  if (lane == 0) loss_rows[row] = w_over_c * sum_h;
  if constexpr (kGrad) {
    const acc_t coef = scale * w_over_c;
    for (int64_t j = lane; j < C; j += TPR) {
      acc_t h, d;
      hinge<P>(c + acc_t(xr[j * sxc]), h, d);
      gr[j] = scalar_t(j == y ? -coef * sum_d : coef * d);
    }
  }
}

template <typename scalar_t, typename acc_t, int TPR>
void launch(const Tensor& input, const Tensor& grad, const Tensor& target, const OptTensor& weight,
            const Tensor& loss_rows, int64_t rows, int64_t C, int64_t p, double margin,
            double scale, int threads) {
  const int64_t per_block = threads / TPR;
  const dim3 blocks(unsigned((rows + per_block - 1) / per_block));
  const cudaStream_t stream = current_stream(input);
  const bool grad_on = grad.numel() > 0, w_on = weight.has_value();
  const scalar_t* wp = w_on ? weight->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* gp = grad_on ? grad.mutable_data_ptr<scalar_t>() : nullptr;
#define LINCLASS_MM_LAUNCH(P, G, W)                                                        \
  multi_margin_kernel<scalar_t, acc_t, TPR, P, G, W><<<blocks, threads, 0, stream>>>(      \
      input.const_data_ptr<scalar_t>(), gp, target.const_data_ptr<int64_t>(), wp,         \
      loss_rows.mutable_data_ptr<acc_t>(), rows, C, input.stride(0), input.stride(1),     \
      acc_t(margin), acc_t(scale))
#define LINCLASS_MM_LAUNCH_P(P)                                                            \
  if (grad_on) { if (w_on) LINCLASS_MM_LAUNCH(P, true, true); else LINCLASS_MM_LAUNCH(P, true, false); } \
  else { if (w_on) LINCLASS_MM_LAUNCH(P, false, true); else LINCLASS_MM_LAUNCH(P, false, false); }
  if (p == 1) {
    LINCLASS_MM_LAUNCH_P(1)
  } else {
    LINCLASS_MM_LAUNCH_P(2)
  }
#undef LINCLASS_MM_LAUNCH_P
#undef LINCLASS_MM_LAUNCH
  check_launch();
}

}  // namespace cuda

std::tuple<Tensor, Tensor> multi_margin_loss_cuda(const Tensor& input, const Tensor& target_,
                                                  int64_t p, double margin, const OptTensor& weight,
                                                  int64_t reduction, bool compute_grad) {
  check_multi_margin_args(input, target_, p, weight, reduction);
  const cuda::DeviceGuard guard(input.get_device_index());
  const Tensor target = as_contiguous(target_);
  const int64_t rows = input.size(0), C = input.size(1);
  const Tensor grad = compute_grad ? empty({rows, C}, input) : empty_none(input);
  const Tensor loss_rows = empty({rows}, acc_scalar_type(input.scalar_type()), input);
  // torch divides the 'mean' of this loss by the number of rows, whatever the weights.
  const double scale = reduction == kMean && rows > 0 ? 1.0 / double(rows) : 1.0;
  if (rows > 0) {
    const auto cfg = cuda::launch_for(C);
    LINCLASS_DISPATCH_FLOATING(input.scalar_type(), "multi_margin_loss_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      if (cfg.tpr == 8)
        cuda::launch<scalar_t, acc_t, 8>(input, grad, target, weight, loss_rows, rows, C, p, margin, scale, cfg.threads);
      else if (cfg.tpr == 32)
        cuda::launch<scalar_t, acc_t, 32>(input, grad, target, weight, loss_rows, rows, C, p, margin, scale, cfg.threads);
      else
        cuda::launch<scalar_t, acc_t, 256>(input, grad, target, weight, loss_rows, rows, C, p, margin, scale, cfg.threads);
    });
  }
  Tensor loss;
  if (reduction == kNone)
    loss = loss_rows;
  else  // 'sum' or 'mean' (0 / 0 = NaN for no rows)
    loss = cuda::reduce_rows(loss_rows, nullptr, reduction == kSum ? 1.0 : double(rows));
  return {loss, grad};
}

}  // namespace linclass
