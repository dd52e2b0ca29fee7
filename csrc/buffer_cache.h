// A small cache of large CPU buffers for the N x C gradients the fused losses write.
//
// Why: glibc returns every block over its mmap threshold (at most 32 MB) to the kernel
// on free, so a training loop that allocates a fresh 100 MB gradient each step pays a
// page fault and a zero-fill for every 4 KiB page, every step.  On the development
// machine that is ~90 ms for a 1024 x 32000 float buffer, several times the cost of
// the loss itself.  The cache keeps a few recently freed blocks (bounded in count and
// bytes) and hands them back for the next request of the same size.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace linclass {

// Uninitialized contiguous CPU tensor; large ones come from the cache.
at::Tensor empty_cached(at::IntArrayRef sizes, at::ScalarType dtype);

// Frees every cached block (tensors still alive are unaffected).
void buffer_cache_clear();

// {cached blocks, cached bytes, hits, misses}.
std::vector<int64_t> buffer_cache_stats();

}  // namespace linclass
