// A small cache of large CPU buffers for the N x C gradients the fused losses write.
//
// Why: glibc returns every block over its mmap threshold (at most 32 MB) to the kernel
// on free, so a training loop that allocates a fresh 100 MB gradient each step pays a
// page fault and a zero-fill for every 4 KiB page, every step.  On the development
// machine that is ~90 ms for a 1024 x 32000 float buffer, several times the cost of
// the loss itself.  The cache keeps a few recently freed blocks (bounded in count and
// bytes) and hands them back for the next request of the same size.
#pragma once

#include "shared_state.h"
#include "tensor_ops.h"

#include <cstdint>
#include <optional>
#include <vector>

namespace linclass {

// Blocks below this go through the normal allocator: malloc already recycles them.
constexpr size_t kMinCachedBytes = size_t(1) << 20;

// Uninitialized CPU tensor of `sizes` with the given strides (which must describe a
// dense layout of its elements; default contiguous); large ones come from the cache (the
// one in linclass._C, shared_state.h), whatever module asks.
inline Tensor empty_cached(IntList sizes, ScalarType dtype, std::optional<IntList> strides = {}) {
  int64_t numel = 1;
  for (auto s : sizes) numel *= s;
  const size_t bytes = size_t(numel) * element_size(dtype);
  const ContiguousStrides contiguous(sizes);
  const IntList layout = strides ? *strides : contiguous.list();
  if (bytes < kMinCachedBytes) return empty_cpu_strided(sizes, layout, dtype);
  void* block = linclass_cache_take(bytes);
  LINCLASS_CHECK(block != nullptr, "linclass: out of memory allocating ", bytes, " bytes");
  return torch::stable::from_blob(block, sizes, layout,
                                  torch::stable::Device(torch::headeronly::DeviceType::CPU), dtype,
                                  [bytes](void* q) { linclass_cache_give_back(q, bytes); });
}

// empty_cached shaped as `input`, in the input's strides where they are dense (a
// column-major matrix, channels-last scores, (B, V, T) = logits.transpose(1, 2)), else
// contiguous: the layout of every CPU gradient linclass returns for an input.  Autograd
// holds a gradient to its input's layout and would otherwise copy a contiguous one into
// it, a transposing copy slower than the loss; the fake kernels (linclass/_ops.py's
// dense_strides) state the same rule.
inline Tensor empty_cached_like(const Tensor& input) {
  if (const auto strides = dense_strides(input))
    return empty_cached(input.sizes(), input.scalar_type(), IntList(strides->data(), strides->size()));
  return empty_cached(input.sizes(), input.scalar_type());
}

// The rest lives in linclass._C (buffer_cache.cpp).
// Frees every cached block (tensors still alive are unaffected).
void buffer_cache_clear();

// {cached blocks, cached bytes, hits, misses}.
std::vector<int64_t> buffer_cache_stats();

}  // namespace linclass
