// Pieces shared by the CUDA loss kernels: row addressing and the reductions of a group
// of TPR threads that works on one row (TPR = 8 or 32: shuffles within a warp;
// TPR = blockDim.x: shuffles, then shared memory across the warps).
#pragma once

#include <cstdint>
#include <limits>

#include "../common.h"
#include "stable_cuda.h"

namespace linclass::cuda {

// RowGeometry in a form kernels take by value.
struct Geom {
  int64_t inner, stride_n, stride_c, stride_k;
  __host__ explicit Geom(const RowGeometry& g)
      : inner(g.inner > 0 ? g.inner : 1), stride_n(g.stride_n), stride_c(g.stride_c), stride_k(g.stride_k) {}
  __device__ int64_t offset(int64_t r) const {
    return inner == 1 ? r * stride_n : (r / inner) * stride_n + (r % inner) * stride_k;
  }
};

template <typename T>
__device__ __forceinline__ T shfl_xor(T v, int mask, int width) {
  return __shfl_xor_sync(0xffffffffu, v, mask, width);
}

// max that keeps a NaN (fmax would drop it)
template <typename T>
__device__ __forceinline__ T max_nan(T a, T b) {
  return (a != a || a > b) ? a : b;
}

struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return max_nan(a, b); }
};

// Reduce `v` over the TPR consecutive threads that share a row; every one of them gets
// the result.  With TPR > 32 (= blockDim.x, one row per block) `smem` holds one slot
// per warp, and all threads of the block must call this.
template <int TPR, typename T, typename Op>
__device__ __forceinline__ T group_reduce(T v, Op op, T* smem) {
  constexpr int kWidth = TPR < 32 ? TPR : 32;
  for (int off = kWidth / 2; off > 0; off /= 2) v = op(v, shfl_xor(v, off, kWidth));
  if constexpr (TPR > 32) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    __syncthreads();  // smem may still be read by a previous reduction
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = smem[0];
    for (int w = 1; w < warps; ++w) v = op(v, smem[w]);  // same order in every thread
  }
  return v;
}

template <typename T>
__device__ __forceinline__ T dev_exp(T v);
template <>
__device__ __forceinline__ float dev_exp<float>(float v) { return expf(v); }
template <>
__device__ __forceinline__ double dev_exp<double>(double v) { return exp(v); }

template <typename T>
__device__ __forceinline__ T nan_value() {
  return std::numeric_limits<T>::quiet_NaN();
}

// Threads per row and rows per block for a row of C classes.
struct Launch {
  int tpr, threads;
};
inline Launch launch_for(int64_t classes) {
  if (classes <= 16) return {8, 256};
  if (classes <= 512) return {32, 256};
  return {256, 256};
}

}  // namespace linclass::cuda
