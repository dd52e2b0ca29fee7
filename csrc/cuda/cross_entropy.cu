// linclass::cross_entropy on CUDA: the fused softmax cross-entropy (loss and d loss /
// d scores in one launch), mirroring cross_entropy.cpp.  The math is the one in
// cpu/cross_entropy.h:
//
//   m = max_j x_j,  d_j = x_j - m,  e_j = exp(d_j),  s = sum_j e_j,  s' = sum_{j != y} e_j
//   loss = (1 - eps) w_y (log s - d_y) + (eps / C) (W log s - sum_j w_j d_j)
//   dx_j = scale [((1 - eps) w_y + (eps / C) W) e_j / s - (eps / C) w_j]          (j != y)
//   dx_y = scale [(eps / C) (W e_y / s - w_y) - (1 - eps) w_y s' / s]
//
// A group of TPR threads takes one row: a pass for the max, a pass for the sums (both
// reduced across the group with shuffles / shared memory, no serial loops), a pass for
// the gradient.  A target outside [0, C) that is not ignore_index gives its row a NaN
// loss and NaN gradient; nothing is read or written out of bounds.  Per-row losses are
// summed by one more launch (reduce.cu, deterministic); the 'mean' scale and the weight sum
// stay on the device, so there is no host synchronization.
#include <cub/block/block_reduce.cuh>

#include <algorithm>

#include "cuda/ops.h"

#include "common.cuh"
#include "reduce.h"

namespace linclass {
namespace cuda {

template <typename scalar_t, typename acc_t, int TPR, bool kGrad, bool kSmooth, bool kWeight>
__global__ void cross_entropy_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ g,
                                     const int64_t* __restrict__ target,
                                     const scalar_t* __restrict__ weight,
                                     acc_t* __restrict__ loss_rows, const acc_t* __restrict__ consts,
                                     int64_t rows, int64_t C, Geom gx, Geom gg,
                                     int64_t ignore_index, acc_t keep, acc_t smooth) {
  __shared__ acc_t smem[32];
  const int64_t row = int64_t(blockIdx.x) * (blockDim.x / TPR) + threadIdx.x / TPR;
  const int lane = threadIdx.x % TPR;
  if (row >= rows) return;  // the whole group (and for TPR = blockDim, the block)
  const int64_t y = target[row];
  const scalar_t* xr = x + gx.offset(row);
  scalar_t* gr = kGrad ? g + gg.offset(row) : nullptr;
  if (y == ignore_index || y < 0 || y >= C) {
    const acc_t fill = y == ignore_index ? acc_t(0) : nan_value<acc_t>();
    if constexpr (kGrad)
      for (int64_t j = lane; j < C; j += TPR) gr[j * gg.stride_c] = scalar_t(fill);
    if (lane == 0) loss_rows[row] = fill;
    return;
  }

  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t j = lane; j < C; j += TPR) m = max_nan(m, acc_t(xr[j * gx.stride_c]));
  m = group_reduce<TPR>(m, MaxOp(), smem);

  acc_t s_excl = 0, e_y = 0, sum_wd = 0;
  for (int64_t j = lane; j < C; j += TPR) {
    const acc_t d = acc_t(xr[j * gx.stride_c]) - m;
    const acc_t e = dev_exp(d);
    if (j == y)
      e_y = e;
    else
      s_excl += e;
    if constexpr (kSmooth) sum_wd += (kWeight ? acc_t(weight[j]) : acc_t(1)) * d;
  }
  s_excl = group_reduce<TPR>(s_excl, SumOp(), smem);
  e_y = group_reduce<TPR>(e_y, SumOp(), smem);
  if constexpr (kSmooth) sum_wd = group_reduce<TPR>(sum_wd, SumOp(), smem);

  const acc_t scale = consts[0], weight_sum = consts[1];
  const acc_t w_y = kWeight ? acc_t(weight[y]) : acc_t(1);
  const acc_t d_y = acc_t(xr[y * gx.stride_c]) - m;
  const acc_t s = s_excl + e_y;
  const acc_t log_s = log(s);
  if (lane == 0) {
    acc_t loss = keep * w_y * (log_s - d_y);
    if constexpr (kSmooth) loss += smooth * (weight_sum * log_s - sum_wd);
    loss_rows[row] = loss;
  }
  if constexpr (kGrad) {
    const acc_t a = scale * (keep * w_y + smooth * weight_sum) / s;
    const acc_t b = scale * smooth;
    const acc_t g_y = scale * (smooth * (weight_sum * e_y / s - w_y) - keep * w_y * s_excl / s);
    for (int64_t j = lane; j < C; j += TPR) {
      acc_t v = a * dev_exp(acc_t(xr[j * gx.stride_c]) - m);
      if constexpr (kSmooth) v -= b * (kWeight ? acc_t(weight[j]) : acc_t(1));
      gr[j * gg.stride_c] = scalar_t(j == y ? g_y : v);
    }
  }
}

// (scale, W, denominator) for the loss kernel: denominator = sum of w_y over the rows
// that are not ignored (their count without a weight; out-of-range targets count 0, their
// rows are NaN anyway), W = sum_j w_j (C without a weight), scale = 1 / denominator for
// 'mean', else 1.
//
// Several blocks share the targets and weights (grid-stride): one block alone would read
// all N targets at one SM's bandwidth, milliseconds at N ~ 10^7, more than the loss
// kernel itself at small C.  Each block writes its partial sums to parts[2 b], parts[2 b
// + 1] and takes a ticket (out[3], zero on entry); the block that draws the last one
// sums the partials in a fixed order and writes out[0..2] (a lone block writes them
// directly).  Deterministic for a given N, C: no atomics touch the sums.
constexpr int kConstsThreads = 256;
constexpr int kConstsMaxBlocks = kConstsThreads;  // the last block reduces one partial per thread

template <typename scalar_t, typename acc_t>
__global__ void consts_kernel(const int64_t* __restrict__ target, const scalar_t* __restrict__ weight,
                              acc_t* __restrict__ out, int64_t n, int64_t C, int64_t ignore_index,
                              bool mean) {
  using Reduce = cub::BlockReduce<acc_t, kConstsThreads>;
  __shared__ typename Reduce::TempStorage tmp;
  __shared__ bool last;
  acc_t* parts = out + 4;
  const int64_t stride = int64_t(gridDim.x) * kConstsThreads;
  acc_t d = 0, w = 0;
  for (int64_t i = int64_t(blockIdx.x) * kConstsThreads + threadIdx.x; i < n; i += stride) {
    const int64_t y = target[i];
    if (y != ignore_index) d += weight ? (y >= 0 && y < C ? acc_t(weight[y]) : acc_t(0)) : acc_t(1);
  }
  if (weight)
    for (int64_t j = int64_t(blockIdx.x) * kConstsThreads + threadIdx.x; j < C; j += stride) w += acc_t(weight[j]);
  const acc_t block_d = Reduce(tmp).Sum(d);
  __syncthreads();
  const acc_t block_w = Reduce(tmp).Sum(w);
  if (gridDim.x == 1) {  // few targets: one block, the result directly (no zeroed ticket)
    if (threadIdx.x == 0) {
      out[0] = mean ? acc_t(1) / block_d : acc_t(1);
      out[1] = weight ? block_w : acc_t(C);
      out[2] = block_d;
    }
    return;
  }
  if (threadIdx.x == 0) {
    parts[2 * blockIdx.x] = block_d;
    parts[2 * blockIdx.x + 1] = block_w;
    __threadfence();  // the partials before the ticket
    last = atomicAdd(out + 3, acc_t(1)) == acc_t(gridDim.x - 1);
  }
  __syncthreads();
  if (!last) return;
  __threadfence();
  const bool mine = threadIdx.x < gridDim.x;
  // __ldcg: from L2, where the other blocks' partials are (not a stale L1 line)
  acc_t denom = Reduce(tmp).Sum(mine ? __ldcg(parts + 2 * threadIdx.x) : acc_t(0));
  // Target weights summing to zero: a NaN 'mean', as torch's 0 / 0 (csrc/cpu/cross_entropy.h).
  if (denom == acc_t(0)) denom = acc_t(NAN);
  __syncthreads();
  const acc_t wsum = Reduce(tmp).Sum(mine ? __ldcg(parts + 2 * threadIdx.x + 1) : acc_t(0));
  if (threadIdx.x == 0) {
    out[0] = mean ? acc_t(1) / denom : acc_t(1);
    out[1] = weight ? wsum : acc_t(C);
    out[2] = denom;
  }
}

template <typename scalar_t, typename acc_t, int TPR>
void launch(const Tensor& input, const Tensor& grad, const Tensor& target, const OptTensor& weight,
            const Tensor& loss_rows, const Tensor& consts, int64_t rows, int64_t C,
            const RowGeometry& gx, const RowGeometry& gg, int64_t ignore_index,
            double label_smoothing, int threads) {
  const bool grad_on = grad.numel() > 0, smooth_on = label_smoothing != 0.0, w_on = weight.has_value();
  const int64_t per_block = threads / TPR;
  const dim3 blocks(unsigned((rows + per_block - 1) / per_block));
  const cudaStream_t stream = current_stream(input);
  const acc_t keep = acc_t(1.0 - label_smoothing), smooth = acc_t(C > 0 ? label_smoothing / C : 0.0);
  const scalar_t* wp = w_on ? weight->const_data_ptr<scalar_t>() : nullptr;
  scalar_t* gp = grad_on ? grad.mutable_data_ptr<scalar_t>() : nullptr;
#define LINCLASS_CE_LAUNCH(G, S, W)                                                         \
  cross_entropy_kernel<scalar_t, acc_t, TPR, G, S, W><<<blocks, threads, 0, stream>>>(      \
      input.const_data_ptr<scalar_t>(), gp, target.const_data_ptr<int64_t>(), wp,          \
      loss_rows.mutable_data_ptr<acc_t>(), consts.const_data_ptr<acc_t>(), rows, C, Geom(gx), \
      Geom(gg), ignore_index, keep, smooth)
  if (grad_on) {
    if (smooth_on) { if (w_on) LINCLASS_CE_LAUNCH(true, true, true); else LINCLASS_CE_LAUNCH(true, true, false); }
    else { if (w_on) LINCLASS_CE_LAUNCH(true, false, true); else LINCLASS_CE_LAUNCH(true, false, false); }
  } else {
    if (smooth_on) { if (w_on) LINCLASS_CE_LAUNCH(false, true, true); else LINCLASS_CE_LAUNCH(false, true, false); }
    else { if (w_on) LINCLASS_CE_LAUNCH(false, false, true); else LINCLASS_CE_LAUNCH(false, false, false); }
  }
#undef LINCLASS_CE_LAUNCH
  check_launch();
}

}  // namespace cuda

std::tuple<Tensor, Tensor> cross_entropy_cuda(const Tensor& input_, const Tensor& target_,
                                              const OptTensor& weight, int64_t ignore_index,
                                              double label_smoothing, int64_t reduction,
                                              bool compute_grad) {
  check_cross_entropy_args(input_, target_, weight, label_smoothing, reduction);
  const cuda::DeviceGuard guard(input_.get_device_index());
  // Not a structured binding: lambdas (the dtype dispatch) capture those only from C++20.
  const std::pair<Tensor, RowGeometry> viewed = rows_of(input_);
  const Tensor& input = viewed.first;
  const RowGeometry& gx = viewed.second;
  const Tensor target = as_contiguous(target_);
  const int64_t rows = gx.rows(), C = gx.classes;
  const ScalarType acc = acc_scalar_type(input.scalar_type());
  const Tensor grad = compute_grad ? empty(input.sizes(), input) : empty_none(input);
  const RowGeometry gg = compute_grad ? *row_geometry(grad) : RowGeometry{};
  const Tensor loss_rows = empty({rows}, acc, input);
  const cudaStream_t stream = cuda::current_stream(input);

  // consts = (scale, W, denominator, ticket, partials), computed on the device by one
  // launch of a few blocks (4 targets per thread and block at least); with one block
  // only the first three, and no fill launch for the ticket.
  const int64_t longest = std::max<int64_t>(target.numel(), weight.has_value() ? C : 1);
  const int blocks = int(std::clamp<int64_t>((longest + 4 * cuda::kConstsThreads - 1) / (4 * cuda::kConstsThreads),
                                             1, cuda::kConstsMaxBlocks));
  const Tensor consts = blocks > 1 ? torch::stable::new_zeros(loss_rows, {4 + 2 * blocks})
                                   : empty({3}, loss_rows);
  LINCLASS_DISPATCH_FLOATING(input.scalar_type(), "cross_entropy_consts", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* wp = weight.has_value() ? weight->const_data_ptr<scalar_t>() : nullptr;
    cuda::consts_kernel<scalar_t, acc_t><<<blocks, cuda::kConstsThreads, 0, stream>>>(
        target.const_data_ptr<int64_t>(), wp, consts.mutable_data_ptr<acc_t>(), target.numel(), C,
        ignore_index, reduction == kMean);
    cuda::check_launch();
  });

  if (rows > 0) {
    const auto cfg = cuda::launch_for(C);
    LINCLASS_DISPATCH_FLOATING(input.scalar_type(), "cross_entropy_cuda", [&] {
      using acc_t = acc_type<scalar_t>;
      if (cfg.tpr == 8)
        cuda::launch<scalar_t, acc_t, 8>(input, grad, target, weight, loss_rows, consts, rows, C, gx, gg, ignore_index, label_smoothing, cfg.threads);
      else if (cfg.tpr == 32)
        cuda::launch<scalar_t, acc_t, 32>(input, grad, target, weight, loss_rows, consts, rows, C, gx, gg, ignore_index, label_smoothing, cfg.threads);
      else
        cuda::launch<scalar_t, acc_t, 256>(input, grad, target, weight, loss_rows, consts, rows, C, gx, gg, ignore_index, label_smoothing, cfg.threads);
    });
  }
  Tensor loss;
  if (reduction == kNone)
    loss = torch::stable::view(loss_rows, target.sizes());
  else if (reduction == kSum)
    loss = cuda::reduce_rows(loss_rows, nullptr, 1.0);
  else {
    const Tensor denom = narrowed(consts, 0, 2, 1);  // consts[2], the 'mean' denominator
    loss = cuda::reduce_rows(loss_rows, &denom, 1.0);
  }
  return {loss, grad};
}

}  // namespace linclass
