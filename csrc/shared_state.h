// What linclass._C keeps once per process and the per-ISA kernel modules
// (linclass._cpu_<isa>, cpu/ops.h) reach through a C interface: the gradient-buffer cache,
// a testing knob, and the table of each module's kernels.
//
// Why C: the stable ABI's C++ types (torch::stable::Tensor and the headeronly types) are
// declared with hidden visibility (HIDDEN_NAMESPACE_BEGIN in torch/headeronly/macros),
// so that two libraries built against different torch versions never bind each other's
// copies.  A C++ function with such a type in its signature is therefore private to its
// library; the host helpers the kernels need (tensor_ops, common, linear_blocks) are
// compiled into every module instead, and only these functions cross between them.
#pragma once

#include <cstddef>
#include <cstdint>

#define LINCLASS_SHARED __attribute__((visibility("default")))

extern "C" {
// A 64-byte aligned block of `bytes` from the cache or the allocator; null when out of
// memory.  Every block goes back through linclass_cache_give_back.
LINCLASS_SHARED void* linclass_cache_take(size_t bytes);
LINCLASS_SHARED void linclass_cache_give_back(void* block, size_t bytes);
// Rows per block of the fused linear ops forced by a test (0 = automatic).
LINCLASS_SHARED int64_t linclass_linear_block_rows();
// Whether the CPU fused linear ops multiply 16-bit weight gradients in the input dtype
// (1) or in float32 (0) for bfloat16 (`bf16` != 0) or float16 inputs: the CPU's answer
// (linear_blocks.h) unless a test forced one.
LINCLASS_SHARED int linclass_linear_16bit_products(int bf16);
// Up to how many classes the CPU fused linear ops take their register-blocked products
// (small_gemm.h) rather than the BLAS's: 11 on Intel CPUs, whose MKL is faster beyond,
// else each module's own limit (-1), unless a test forced a count.
LINCLASS_SHARED int64_t linclass_small_gemm_classes();
// Whether the CPU fused linear ops' float32 products go through oneDNN (torch's
// mkldnn::_linear_pointwise) rather than the BLAS (aten::mm, MKL on x86): off Intel,
// where MKL's kernels for these shapes run well below oneDNN's, when torch has oneDNN,
// unless a test forced a choice (linear_blocks.h, block_product).
LINCLASS_SHARED int linclass_linear_onednn();
// Up to how many classes the CPU lane path moves a tile's rows by vector permutes
// (transpose.h): 7 on Intel CPUs, 4 elsewhere, unless a test forced a count.
LINCLASS_SHARED int64_t linclass_lane_permute_classes();
// Up to how many classes cross-entropy rows take the CPU lane path before the group path
// (row_driver.h, group_min_classes): 39 on Intel CPUs, 47 elsewhere, unless a test
// forced a count.
LINCLASS_SHARED int64_t linclass_cross_entropy_lane_classes();
// Offers a module's `const linclass::CpuKernels*`; returns 0, or -1 when the table of
// every ISA is already taken.
LINCLASS_SHARED int linclass_offer_cpu_kernels(const void* table);
}
