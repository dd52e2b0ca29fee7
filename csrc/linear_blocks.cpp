#include "linear_blocks.h"

#include "buffer_cache.h"
#include "common.h"
#include "parallel.h"
#include "shared_state.h"

#include <atomic>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace linclass {
int64_t linear_block_rows_override() { return linclass_linear_block_rows(); }

bool cpu_multiplies_16bit(bool bf16) {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax, ebx, ecx, edx;
  if (__get_cpuid_max(0, nullptr) < 7) return false;
  __cpuid_count(7, 0, eax, ebx, ecx, edx);
  const unsigned leaf7_edx = edx;
  __cpuid_count(7, 1, eax, ebx, ecx, edx);
  const unsigned leaf7_1_eax = eax;
  const bool amx_bf16 = (leaf7_edx >> 22) & 1, avx512_bf16 = (leaf7_1_eax >> 5) & 1;
  const bool amx_fp16 = (leaf7_1_eax >> 21) & 1;
  return bf16 ? amx_bf16 || avx512_bf16 : amx_fp16;
#else
  return false;
#endif
}

bool cpu_is_intel() {
#if defined(__x86_64__) || defined(__i386__)
  unsigned eax, ebx, ecx, edx;
  if (!__get_cpuid(0, &eax, &ebx, &ecx, &edx)) return false;
  return ebx == 0x756e6547 && edx == 0x49656e69 && ecx == 0x6c65746e;  // "GenuineIntel"
#else
  return false;
#endif
}

void check_linear_args(const char* op, const Tensor& input, const Tensor& weight,
                       const OptTensor& bias, const Tensor& target,
                       int64_t reduction, const Mask& mask) {
  LINCLASS_CHECK(input.dim() == 2, op, ": input must be (N, D), got ", shape_string(input.sizes()));
  LINCLASS_CHECK(weight.dim() == 2 && weight.size(1) == input.size(1), op,
              ": weight must be (C, D) with D = ", input.size(1), ", got ", shape_string(weight.sizes()));
  LINCLASS_CHECK(weight.scalar_type() == input.scalar_type(), op, ": weight dtype ",
              weight.scalar_type(), " does not match input dtype ", input.scalar_type());
  LINCLASS_CHECK(same_device(weight, input), op, ": weight and input are on different devices");
  if (bias) {
    LINCLASS_CHECK(bias->dim() == 1 && bias->size(0) == weight.size(0), op,
                ": bias must be (C,) with C = ", weight.size(0), ", got ", shape_string(bias->sizes()));
    LINCLASS_CHECK(bias->scalar_type() == input.scalar_type() && same_device(*bias, input),
                op, ": bias must have the input's dtype and device");
  }
  LINCLASS_CHECK(!mask[2] || bias, op, ": a bias gradient was asked for without a bias");
  LINCLASS_CHECK(target.dim() == 1 && target.size(0) == input.size(0), op,
              ": target must be (N,) with N = ", input.size(0), ", got ", shape_string(target.sizes()));
  LINCLASS_CHECK(target.scalar_type() == ScalarType::Long, op, ": target must be int64, got ",
              target.scalar_type());
  LINCLASS_CHECK(reduction == kMean || reduction == kSum, op,
              ": only 'mean' and 'sum' are fused (got reduction code ", reduction, ")");
}

namespace {
// A gradient output like `input`: on the CPU from the buffer cache, since dW of a
// 128256 x 1024 head is 0.5 GB, whose page faults cost more than the whole step when
// it is freshly allocated each call (buffer_cache.h).
Tensor empty_grad(IntList sizes, const Tensor& input) {
  return input.is_cpu() ? empty_cached(sizes, input.scalar_type()) : empty(sizes, input);
}

// The input's gradient: on the CPU in the input's strides where they are dense (a
// column-major x.t()), as the fused losses' gradients (empty_cached_like).
Tensor empty_input_grad(const Tensor& input) {
  return input.is_cpu() ? empty_cached_like(input) : empty(input.sizes(), input);
}
}  // namespace

Grads empty_grads(const Tensor& input, const Tensor& weight, const Mask& mask) {
  return {mask[0] ? empty_input_grad(input) : empty_none(input),
          mask[1] ? empty_grad({weight.size(0), weight.size(1)}, input) : empty_none(input),
          mask[2] ? empty({weight.size(0)}, input) : empty_none(input)};
}

void block_product(const Tensor& out, const Tensor& a, const Tensor& b, const OptTensor& bias,
                   bool accumulate) {
  const bool onednn = out.is_cpu() && out.scalar_type() == ScalarType::Float &&
                      a.scalar_type() == ScalarType::Float && b.scalar_type() == ScalarType::Float &&
                      a.size(0) * a.size(1) * b.size(1) >= kOneDnnMinWork &&
                      linclass_linear_onednn() != 0;
  if (onednn) {
    // Each call's result is a new tensor: at most kOneDnnOutBytes, so that glibc reuses
    // the memory the last one freed instead of mapping fresh pages (whose faults cost
    // as much as a large product), and little memory is added to the op's.
    // A product is cut along out's rows (each part reads all of b) or columns (all of
    // a), whichever re-reads the smaller operand.
    const int64_t M = out.size(0), N = out.size(1);
    const int64_t parts = std::max<int64_t>(1, (M * N * 4 + kOneDnnOutBytes - 1) / kOneDnnOutBytes);
    const bool by_rows = a.size(0) * a.size(1) >= b.size(0) * b.size(1);
    const int64_t extent = by_rows ? M : N, step = (extent + parts - 1) / parts;
    for (int64_t i0 = 0; i0 < extent; i0 += step) {
      const int64_t n = std::min(step, extent - i0);
      const Tensor part = n == extent ? out : narrowed(out, by_rows ? 0 : 1, i0, n);
      const Tensor ap = by_rows && n < extent ? narrowed(a, 0, i0, n) : a;
      // oneDNN's weight is (out features, in features): b^T, or the part's columns of it,
      // copied where they are no dense matrix (the columns of a row-major b): oneDNN ran
      // such a weight far slower (bench/results/linear-gemm-floor.md).
      Tensor w = by_rows || n == extent ? transposed(b) : narrowed(transposed(b), 0, i0, n);
      if (!w.is_contiguous() && !transposed(w).is_contiguous()) w = as_contiguous(w);
      const OptTensor bp = bias && !by_rows && n < extent ? OptTensor(narrowed(*bias, 0, i0, n)) : bias;
      copy_into(part, accumulate ? onednn_linear_add(ap, part, w) : onednn_linear(ap, w, bp));
    }
  } else if (accumulate) {
    addmm_(out, a, b);
  } else if (bias) {
    addmm_out(out, *bias, a, b);
  } else {
    mm_out(out, a, b);
  }
}

bool GradAccumulator::native_16bit_products(ScalarType dtype) {
  return linclass_linear_16bit_products(dtype == ScalarType::BFloat16) != 0;
}

void GradAccumulator::add(const Tensor& dS, const Tensor& Xb, const Tensor& W, int64_t r0) {
  if (mask_[0]) {
    block_product(narrowed(g_.input, 0, r0, dS.size(0)), dS, W);
  }
  if (mask_[1]) add_weight_grad(dS, Xb, r0);
  add_bias(dS);
}

void GradAccumulator::add_in_float32(const Tensor& dS, const Tensor& dSf, const Tensor& Xf,
                                     const Tensor& Wf, int64_t r0) {
  copy_into(dSf, dS);  // exact
  if (mask_[0]) {
    const Tensor part = empty_cached({dS.size(0), Wf.size(1)}, acc_type_);
    block_product(part, dSf, Wf);
    copy_into(narrowed(g_.input, 0, r0, dS.size(0)), part);
  }
  if (mask_[1]) add_weight_grad(dSf, Xf, r0);  // float32 operands: no further conversion
  add_bias(dS);
}

namespace {
// sum += part, float32 += 16-bit, both contiguous with the same number of elements.
template <typename T>
void add_widened(float* sum, const T* part, int64_t n) {
  linclass::parallel_for(0, n, int64_t(1) << 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) sum[i] += static_cast<float>(part[i]);
  });
}

// sums[j] += rows[i][j] over the n rows in order, float32 += 16-bit: each thread takes a
// range of columns, so the sums do not depend on the thread count.
template <typename T>
void add_column_sums(float* sums, const T* rows, int64_t n, int64_t columns) {
  linclass::parallel_for(0, columns, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t i = 0; i < n; ++i) {
      const T* row = rows + i * columns;
      for (int64_t j = begin; j < end; ++j) sums[j] += static_cast<float>(row[j]);
    }
  });
}
}  // namespace

void GradAccumulator::add_weight_grad(const Tensor& dS, const Tensor& Xb, int64_t r0) {
  if (products_in_input_dtype_) {  // (linear_blocks.h)
    mm_out(g_.weight, transposed(dS), Xb);
    const bool only_block = !started_ && r0 == 0 && dS.size(0) == total_rows_;
    if (only_block) {
      started_ = true;
      return;
    }
    if (!started_) {
      dW_ = empty_cached(g_.weight.sizes(), acc_type_);  // not page-faulted afresh each call
      copy_into(dW_, g_.weight);
    } else if (g_.weight.scalar_type() == ScalarType::BFloat16) {
      add_widened(dW_.mutable_data_ptr<float>(), g_.weight.const_data_ptr<BFloat16>(), dW_.numel());
    } else {
      add_widened(dW_.mutable_data_ptr<float>(), g_.weight.const_data_ptr<Half>(), dW_.numel());
    }
    started_ = true;
    return;
  }
  const Tensor dSt = low_ ? to_dtype(transposed(dS), acc_type_) : transposed(dS);
  const Tensor X = low_ ? to_dtype(Xb, acc_type_) : Xb;
  if (!started_) {
    if (low_) dW_ = empty_cached(g_.weight.sizes(), acc_type_);  // the first block; later ones accumulate
    block_product(low_ ? dW_ : g_.weight, dSt, X);
    started_ = true;
  } else {
    block_product(low_ ? dW_ : g_.weight, dSt, X, std::nullopt, /*accumulate=*/true);
  }
}

void GradAccumulator::add_bias(const Tensor& dS) {
  if (!mask_[2]) return;
  if (!low_ || !dS.is_cpu()) {
    const Tensor sums = column_sums(dS, acc_type_);
    db_ = db_.defined() ? added(db_, sums) : sums;
    return;
  }
  // 16-bit on the CPU: torch's sum in float32 would first convert the whole block.
  if (!db_.defined()) {
    db_ = empty_cpu({dS.size(1)}, acc_type_);
    fill_zero(db_);
  }
  const Tensor rows = as_contiguous(dS);
  if (rows.scalar_type() == ScalarType::BFloat16)
    add_column_sums(db_.mutable_data_ptr<float>(), rows.const_data_ptr<BFloat16>(), rows.size(0), rows.size(1));
  else
    add_column_sums(db_.mutable_data_ptr<float>(), rows.const_data_ptr<Half>(), rows.size(0), rows.size(1));
}

void GradAccumulator::finish() {
  if (mask_[1] && !started_) fill_zero(g_.weight);  // no rows
  if (mask_[1] && dW_.defined()) copy_into(g_.weight, dW_);
  if (mask_[2]) {
    if (db_.defined()) copy_into(g_.bias, db_);
    else fill_zero(g_.bias);
  }
}

}  // namespace linclass
