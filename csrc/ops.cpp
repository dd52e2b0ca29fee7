// The linclass operator library, registered in one place on the LibTorch stable ABI:
// the schema of every op and its kernel for each device (cpu/ops.h, cuda/ops.h, one
// file per op family in those folders; CPU kernels are reached through the table of
// the active ISA, see cpu/ops.h).  Autograd and the fake kernels are registered from
// Python (linclass/_ops.py).  Also the Python module stub that loads this library.
#include <Python.h>

#include <atomic>

#include "buffer_cache.h"
#include "cpu/ops.h"
#include "linear_blocks.h"
#include "shared_state.h"
#include "tensor_ops.h"
#ifdef LINCLASS_WITH_CUDA
#include "cuda/ops.h"
#endif

// `import linclass._C` only needs to load this library so that the STABLE_TORCH_LIBRARY
// initializers below run; the module itself is empty (no pybind11, so the extension
// builds against the limited Python API).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}

namespace linclass {
namespace {

using Out2 = std::tuple<Tensor, Tensor>;
using Out4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

Mask to_mask(const std::vector<bool>& mask) {
  LINCLASS_CHECK(mask.size() == 3, "output_mask must have 3 entries, got ", mask.size());
  return {mask[0], mask[1], mask[2]};
}

// ---- CPU: every op calls the active ISA's build of its kernel (cpu/ops.h) ------------

const CpuKernels& cpu() { return active_cpu_kernels(); }

Out2 cross_entropy_cpu_op(Tensor input, Tensor target, OptTensor weight, int64_t ignore_index,
                          double label_smoothing, int64_t reduction, bool compute_grad) {
  return cpu().cross_entropy(input, target, weight, ignore_index, label_smoothing, reduction,
                             compute_grad);
}
Out2 cross_entropy_probs_cpu_op(Tensor input, Tensor target, OptTensor weight,
                                double label_smoothing, int64_t reduction, bool compute_grad) {
  return cpu().cross_entropy_probs(input, target, weight, label_smoothing, reduction, compute_grad);
}
Out2 multi_margin_loss_cpu_op(Tensor input, Tensor target, int64_t p, double margin,
                              OptTensor weight, int64_t reduction, bool compute_grad) {
  return cpu().multi_margin_loss(input, target, p, margin, weight, reduction, compute_grad);
}
Out4 linear_cross_entropy_cpu_op(Tensor input, Tensor weight, OptTensor bias, Tensor target,
                                 int64_t ignore_index, double label_smoothing, int64_t reduction,
                                 std::vector<bool> mask) {
  return cpu().linear_cross_entropy(input, weight, bias, target, ignore_index, label_smoothing,
                                    reduction, to_mask(mask));
}
Out4 linear_multi_margin_loss_cpu_op(Tensor input, Tensor weight, OptTensor bias, Tensor target,
                                     int64_t p, double margin, int64_t reduction,
                                     std::vector<bool> mask) {
  return cpu().linear_multi_margin_loss(input, weight, bias, target, p, margin, reduction,
                                        to_mask(mask));
}
void block_product_op(Tensor out, Tensor a, Tensor b, OptTensor bias, bool accumulate) {
  LINCLASS_CHECK(out.dim() == 2 && a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0) &&
                     out.size(0) == a.size(0) && out.size(1) == b.size(1),
                 "_block_product: out ", shape_string(out.sizes()), " != a ", shape_string(a.sizes()),
                 " @ b ", shape_string(b.sizes()));
  LINCLASS_CHECK(!bias || (bias->dim() == 1 && bias->size(0) == out.size(1)),
                 "_block_product: bias must be (", out.size(1), ",), got ",
                 shape_string(bias->sizes()));
  block_product(out, a, b, bias, accumulate);
}
double sgd_step_op(Tensor input, Tensor weight, Tensor target, Tensor index, int64_t loss,
                   double learning_rate, double reg) {
  return cpu().sgd_step(input, weight, target, index, loss, learning_rate, reg);
}
void sgd_sweep_step_op(Tensor input, Tensor weight, Tensor target, Tensor index, int64_t loss,
                       int64_t runs, Tensor decay, Tensor grad_scale) {
  cpu().sgd_sweep_step(input, weight, target, index, loss, runs, decay, grad_scale);
}
Tensor ce_shard_stats_op(Tensor x, Tensor target, int64_t start, OptTensor weight, bool smoothing,
                         int64_t ignore_index) {
  return cpu().ce_shard_stats(x, target, start, weight, smoothing, ignore_index);
}
Tensor ce_shard_grad_op(Tensor x, Tensor target, int64_t start, OptTensor weight, Tensor shift,
                        Tensor exp_coef, Tensor weight_coef, Tensor target_grad,
                        int64_t ignore_index, OptTensor out) {
  return cpu().ce_shard_grad(x, target, start, weight, shift, exp_coef, weight_coef, target_grad,
                             ignore_index, out);
}
Out2 mm_shard_grad_op(Tensor x, Tensor target, int64_t start, Tensor x_y, Tensor row_coef,
                      int64_t p, double margin, bool compute_grad) {
  return cpu().mm_shard_grad(x, target, start, x_y, row_coef, p, margin, compute_grad);
}
Tensor ce_probs_shard_stats_op(Tensor x, Tensor target, OptTensor weight, double label_smoothing,
                               int64_t classes) {
  return cpu().ce_probs_shard_stats(x, target, weight, label_smoothing, classes);
}
Tensor ce_probs_shard_grad_op(Tensor x, Tensor target, OptTensor weight, double label_smoothing,
                              int64_t classes, Tensor shift, Tensor exp_coef, double scale) {
  return cpu().ce_probs_shard_grad(x, target, weight, label_smoothing, classes, shift, exp_coef,
                                   scale);
}

#ifdef LINCLASS_WITH_CUDA
Out4 linear_cross_entropy_cuda_op(Tensor input, Tensor weight, OptTensor bias, Tensor target,
                                  int64_t ignore_index, double label_smoothing, int64_t reduction,
                                  std::vector<bool> mask) {
  return linear_cross_entropy_cuda(input, weight, bias, target, ignore_index, label_smoothing,
                                   reduction, to_mask(mask));
}
Out4 linear_multi_margin_loss_cuda_op(Tensor input, Tensor weight, OptTensor bias, Tensor target,
                                      int64_t p, double margin, int64_t reduction,
                                      std::vector<bool> mask) {
  return linear_multi_margin_loss_cuda(input, weight, bias, target, p, margin, reduction,
                                       to_mask(mask));
}
#endif

// ---- build facts and testing knobs -------------------------------------------------

std::string cpu_isa() { return active_cpu_isa(); }
std::string set_cpu_isa(std::string isa) { return use_cpu_kernels(isa); }
std::vector<std::string> cpu_isas() { return offered_cpu_isas(); }
void cache_clear() { buffer_cache_clear(); }
std::vector<int64_t> cache_stats() { return buffer_cache_stats(); }
std::atomic<int64_t> g_block_rows_override{0};
int64_t linear_block_rows(int64_t rows) { return g_block_rows_override.exchange(rows); }
std::atomic<int64_t> g_small_gemm_classes_override{-1};  // -1: by the CPU's vendor
int64_t small_gemm_classes(int64_t classes) { return g_small_gemm_classes_override.exchange(classes); }
std::atomic<int64_t> g_lane_permute_classes_override{-1};  // -1: by the CPU's vendor
std::atomic<int64_t> g_cross_entropy_lane_classes_override{-1};  // -1: by the CPU's vendor
int64_t cross_entropy_lane_classes(int64_t classes) {
  return g_cross_entropy_lane_classes_override.exchange(classes);
}
int64_t lane_permute_classes(int64_t classes) { return g_lane_permute_classes_override.exchange(classes); }
std::atomic<int64_t> g_onednn_override{-1};  // -1: by the CPU's vendor
int64_t linear_onednn(int64_t mode) { return g_onednn_override.exchange(mode); }
std::atomic<bool> g_onednn_available{true};
bool set_onednn_available(bool available) { return g_onednn_available.exchange(available); }
std::atomic<int64_t> g_16bit_products_override{-1};  // -1: as the CPU says
int64_t linear_16bit_products(int64_t mode) { return g_16bit_products_override.exchange(mode); }
bool native_16bit_products(bool bfloat16) { return linclass_linear_16bit_products(bfloat16) != 0; }

}  // namespace
}  // namespace linclass

extern "C" int64_t linclass_linear_block_rows() { return linclass::g_block_rows_override.load(); }
extern "C" int64_t linclass_small_gemm_classes() {
  const int64_t forced = linclass::g_small_gemm_classes_override.load();
  if (forced >= 0) return forced;
  static const bool intel = linclass::cpu_is_intel();  // cpuid traps on a VM: once
  return intel ? 11 : -1;
}
extern "C" int64_t linclass_lane_permute_classes() {
  const int64_t forced = linclass::g_lane_permute_classes_override.load();
  if (forced >= 0) return forced;
  // Intel's cores run a 512-bit two-source permute (vpermt2ps) at one a cycle; on the
  // AMD EPYC (Zen 5) VM it is slower, and the permutes lost to the pair transposes from
  // 5 classes (bench/results/class-count-ab.md).
  static const bool intel = linclass::cpu_is_intel();  // cpuid traps on a VM: once
  return intel ? 7 : 4;
}
extern "C" int64_t linclass_cross_entropy_lane_classes() {
  const int64_t forced = linclass::g_cross_entropy_lane_classes_override.load();
  if (forced >= 0) return forced;
  // On the Intel VM the group path took over from 40 classes; on the AMD EPYC (Zen 5)
  // VM the lanes were faster than the groups to 47 classes, in training and evaluation
  // (bench/results/class-count-ab.md).
  static const bool intel = linclass::cpu_is_intel();  // cpuid traps on a VM: once
  return intel ? 39 : 47;
}
extern "C" int linclass_linear_onednn() {
  if (!linclass::g_onednn_available.load()) return 0;
  const int64_t forced = linclass::g_onednn_override.load();
  if (forced >= 0) return int(forced != 0);
  // On an AMD EPYC (Zen 5) MKL ran the fused linear ops' products at a fraction of
  // oneDNN's speed (its generic kernels off Intel; bench/results/linear-gemm-floor.md);
  // Intel CPUs keep MKL's own kernels (the two not yet compared on one).
  static const bool intel = linclass::cpu_is_intel();  // cpuid traps on a VM: once
  return int(!intel);
}
extern "C" int linclass_linear_16bit_products(int bf16) {
  const int64_t forced = linclass::g_16bit_products_override.load();
  if (forced >= 0) return int(forced);
  // Asked once per 16-bit linear op call; cpuid traps to the hypervisor on a VM.
  static const bool native_fp16 = linclass::cpu_multiplies_16bit(false);
  static const bool native_bf16 = linclass::cpu_multiplies_16bit(true);
  return int(bf16 ? native_bf16 : native_fp16);
}

namespace linclass {

STABLE_TORCH_LIBRARY(linclass, m) {
  // Fused class-index losses.  They return (loss, grad): `grad` is d loss / d input for
  // grad_output = 1, computed in the same pass as the loss when compute_grad is true
  // (an empty tensor otherwise); backward only rescales it.  `reduction` uses torch's
  // Reduction codes (0 none, 1 mean, 2 sum).  The loss is in the accumulation dtype
  // (float32 for 16-bit inputs), so that under torch.autocast the float32 loss torch
  // gives comes from the 16-bit scores without a float32 copy of them.
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  // Cross-entropy against class probabilities (target: the input's shape and dtype);
  // CPU only.
  m.def(
      "cross_entropy_probs(Tensor input, Tensor target, Tensor? weight, float label_smoothing, "
      "int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "multi_margin_loss(Tensor input, Tensor target, int p, float margin, Tensor? weight, "
      "int reduction, bool compute_grad) -> (Tensor, Tensor)");

  // Fused linear + loss (linear_blocks.h): loss(input @ weight.T + bias, target) and
  // (grad_input, grad_weight, grad_bias) for grad_output = 1, each only where
  // output_mask asks for it (else an empty tensor).  'mean' and 'sum' only.  The loss
  // in the accumulation dtype, as above.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target, "
      "int ignore_index, float label_smoothing, int reduction, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_multi_margin_loss(Tensor input, Tensor weight, Tensor? bias, Tensor target, int p, "
      "float margin, int reduction, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // out = a @ b (+ bias), or out += a @ b: a block's product as the fused linear ops make
  // it on the CPU (linear_blocks.h, block_product), for their Python paths
  // (linclass/_linear_blocks.py).
  m.def("_block_product(Tensor(a!) out, Tensor a, Tensor b, Tensor? bias, bool accumulate) -> ()");

  // One SGD step of the classic linear classifier (cpu/linear_sgd.cpp, CPU float32): the
  // weight, stored (C, D), is updated in place; returns the minibatch loss.
  m.def(
      "linear_sgd_step(Tensor input, Tensor(a!) weight, Tensor target, Tensor index, "
      "int loss, float learning_rate, float reg) -> float");
  // One step of K such runs side by side (linclass.sgd.linear_sgd_sweep_step): weight
  // (D, K * C), updated in place; decay and grad_scale hold one factor per column.
  m.def(
      "linear_sgd_sweep_step(Tensor input, Tensor(a!) weight, Tensor target, Tensor index, "
      "int loss, int runs, Tensor decay, Tensor grad_scale) -> ()");

  // The phases of the class-sharded losses (cpu/sharded.cpp; kernels/sharded.py on GPUs),
  // internal to linclass/_sharded.py: detached tensors, no autograd.
  m.def(
      "_ce_shard_stats(Tensor x, Tensor target, int start, Tensor? weight, bool smoothing, "
      "int ignore_index) -> Tensor");
  m.def(
      "_ce_shard_grad(Tensor x, Tensor target, int start, Tensor? weight, Tensor shift, "
      "Tensor exp_coef, Tensor weight_coef, Tensor target_grad, int ignore_index, "
      "Tensor(a!)? out) -> Tensor");
  m.def(
      "_mm_shard_grad(Tensor x, Tensor target, int start, Tensor x_y, Tensor row_coef, int p, "
      "float margin, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "_ce_probs_shard_stats(Tensor x, Tensor target, Tensor? weight, float label_smoothing, "
      "int classes) -> Tensor");
  m.def(
      "_ce_probs_shard_grad(Tensor x, Tensor target, Tensor? weight, float label_smoothing, "
      "int classes, Tensor shift, Tensor exp_coef, float scale) -> Tensor");

  // The CPU kernels' ISA: the active one, switching it, the loaded ones (cpu/ops.h).
  m.def("_cpu_isa() -> str");
  m.def("_set_cpu_isa(str isa) -> str");
  m.def("_cpu_isas() -> str[]");
  // The CPU gradient-buffer cache (buffer_cache.h) and testing knobs: the fused linear
  // ops' rows per block (0 = automatic) and their 16-bit weight-gradient products (-1 =
  // as the CPU says, 0 = float32, 1 = the input dtype; linear_blocks.h); each returns
  // the previous setting.
  m.def("_buffer_cache_clear() -> ()");
  m.def("_buffer_cache_stats() -> int[]");
  m.def("_linear_block_rows(int rows) -> int");
  m.def("_linear_16bit_products(int mode) -> int");
  // Up to how many classes the CPU fused linear ops take the register-blocked products
  // (-1 = by the CPU's vendor, see linear_blocks.h; capped by the kernel module's own
  // limit); returns the previous setting.
  m.def("_small_gemm_classes(int classes) -> int");
  // Whether the CPU fused linear ops' float32 products go through oneDNN (-1 = by the
  // CPU's vendor, 0 = the BLAS, 1 = oneDNN; linear_blocks.h); returns the previous
  // setting.  linclass/_extension.py tells _set_onednn_available whether this torch
  // has oneDNN's op at all (without it the BLAS always).
  m.def("_linear_onednn(int mode) -> int");
  m.def("_set_onednn_available(bool available) -> bool");
  // Up to how many classes the CPU lane path moves rows of a tile by permutes (-1 = by
  // the CPU's vendor, transpose.h; capped by the kernel module's own limit); returns the
  // previous setting.
  m.def("_lane_permute_classes(int classes) -> int");
  // Up to how many classes cross-entropy rows take the CPU lane path before the group
  // path (-1 = by the CPU's vendor, row_driver.h); returns the previous setting.
  m.def("_cross_entropy_lane_classes(int classes) -> int");
  // Whether the linear ops' 16-bit products run in the input dtype on this CPU (the
  // knob above, else the CPU's instructions): the class-sharded linear ops ask it too.
  m.def("_native_16bit_products(bool bfloat16) -> bool");
}

// The ops without tensor arguments have no device to dispatch on: CompositeExplicitAutograd.
STABLE_TORCH_LIBRARY_IMPL(linclass, CompositeExplicitAutograd, m) {
  m.impl("_cpu_isa", TORCH_BOX(&cpu_isa));
  m.impl("_set_cpu_isa", TORCH_BOX(&set_cpu_isa));
  m.impl("_cpu_isas", TORCH_BOX(&cpu_isas));
  m.impl("_buffer_cache_clear", TORCH_BOX(&cache_clear));
  m.impl("_buffer_cache_stats", TORCH_BOX(&cache_stats));
  m.impl("_linear_block_rows", TORCH_BOX(&linear_block_rows));
  m.impl("_linear_16bit_products", TORCH_BOX(&linear_16bit_products));
  m.impl("_small_gemm_classes", TORCH_BOX(&small_gemm_classes));
  m.impl("_linear_onednn", TORCH_BOX(&linear_onednn));
  m.impl("_set_onednn_available", TORCH_BOX(&set_onednn_available));
  m.impl("_lane_permute_classes", TORCH_BOX(&lane_permute_classes));
  m.impl("_cross_entropy_lane_classes", TORCH_BOX(&cross_entropy_lane_classes));
  m.impl("_native_16bit_products", TORCH_BOX(&native_16bit_products));
}

STABLE_TORCH_LIBRARY_IMPL(linclass, CPU, m) {
  m.impl("cross_entropy", TORCH_BOX(&cross_entropy_cpu_op));
  m.impl("cross_entropy_probs", TORCH_BOX(&cross_entropy_probs_cpu_op));
  m.impl("multi_margin_loss", TORCH_BOX(&multi_margin_loss_cpu_op));
  m.impl("linear_cross_entropy", TORCH_BOX(&linear_cross_entropy_cpu_op));
  m.impl("linear_multi_margin_loss", TORCH_BOX(&linear_multi_margin_loss_cpu_op));
  m.impl("linear_sgd_step", TORCH_BOX(&sgd_step_op));
  m.impl("_block_product", TORCH_BOX(&block_product_op));
  m.impl("linear_sgd_sweep_step", TORCH_BOX(&sgd_sweep_step_op));
  m.impl("_ce_shard_stats", TORCH_BOX(&ce_shard_stats_op));
  m.impl("_ce_shard_grad", TORCH_BOX(&ce_shard_grad_op));
  m.impl("_mm_shard_grad", TORCH_BOX(&mm_shard_grad_op));
  m.impl("_ce_probs_shard_stats", TORCH_BOX(&ce_probs_shard_stats_op));
  m.impl("_ce_probs_shard_grad", TORCH_BOX(&ce_probs_shard_grad_op));
}

#ifdef LINCLASS_WITH_CUDA
STABLE_TORCH_LIBRARY_IMPL(linclass, CUDA, m) {
  m.impl("cross_entropy", TORCH_BOX(&cross_entropy_cuda));
  m.impl("multi_margin_loss", TORCH_BOX(&multi_margin_loss_cuda));
  m.impl("linear_cross_entropy", TORCH_BOX(&linear_cross_entropy_cuda_op));
  m.impl("linear_multi_margin_loss", TORCH_BOX(&linear_multi_margin_loss_cuda_op));
}
#endif

}  // namespace linclass
