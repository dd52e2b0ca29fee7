// The linclass operator library, registered in one place: the schema of every op, its
// autograd (autograd.h) and its kernel for each device (cpu/ops.h, cuda/ops.h, one file
// per op family in those folders; CPU kernels are reached through the table of the
// active ISA, see cpu/ops.h).  Also the Python module stub that loads this shared object.
#include <Python.h>

#include <torch/library.h>

#include "autograd.h"
#include "buffer_cache.h"
#include "cpu/ops.h"
#include "linear_blocks.h"
#ifdef LINCLASS_WITH_CUDA
#include "cuda/ops.h"
#endif

extern "C" {
// `import linclass._C` only needs to load this library so that the TORCH_LIBRARY
// initializers below run; the module itself is empty (no pybind11, so the extension
// builds against the limited Python API).
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace linclass {
namespace {

// ---- autograd: each op's arguments handed to its backward node (autograd.h) ----------

using OptTensor = const std::optional<at::Tensor>&;

std::tuple<at::Tensor, at::Tensor> cross_entropy_autograd(const at::Tensor& input,
                                                          const at::Tensor& target, OptTensor weight,
                                                          int64_t ignore_index, double label_smoothing,
                                                          int64_t reduction, bool compute_grad) {
  static const auto op = typed_op<decltype(cross_entropy_cpu)>("linclass::cross_entropy");
  return fused_loss_autograd(op, input, target, weight, ignore_index, label_smoothing, reduction,
                             compute_grad);
}

std::tuple<at::Tensor, at::Tensor> multi_margin_loss_autograd(const at::Tensor& input,
                                                              const at::Tensor& target, int64_t p,
                                                              double margin, OptTensor weight,
                                                              int64_t reduction, bool compute_grad) {
  static const auto op = typed_op<decltype(multi_margin_loss_cpu)>("linclass::multi_margin_loss");
  return fused_loss_autograd(op, input, target, p, margin, weight, reduction, compute_grad);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_autograd(
    const at::Tensor& input, const at::Tensor& weight, OptTensor bias, const at::Tensor& target,
    int64_t ignore_index, double label_smoothing, int64_t reduction, Mask mask) {
  static const auto op = typed_op<decltype(linear_cross_entropy_cpu)>("linclass::linear_cross_entropy");
  return fused_linear_loss_autograd(op, input, weight, bias, target, ignore_index, label_smoothing,
                                    reduction, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_multi_margin_loss_autograd(
    const at::Tensor& input, const at::Tensor& weight, OptTensor bias, const at::Tensor& target,
    int64_t p, double margin, int64_t reduction, Mask mask) {
  static const auto op =
      typed_op<decltype(linear_multi_margin_loss_cpu)>("linclass::linear_multi_margin_loss");
  return fused_linear_loss_autograd(op, input, weight, bias, target, p, margin, reduction, mask);
}

// ---- CPU: every op calls the active ISA's build of its kernel ------------------------

// The CpuKernels member M as a plain function with the kernel's signature.
template <typename Fn>
struct ViaActiveTable;
template <typename R, typename... Args>
struct ViaActiveTable<R (*)(Args...)> {
  template <R (*CpuKernels::*M)(Args...)>
  static R call(Args... args) {
    return (active_cpu_kernels().*M)(std::forward<Args>(args)...);
  }
};
template <typename T>
struct MemberType;
template <typename T>
struct MemberType<T CpuKernels::*> {
  using type = T;
};
template <auto M>
constexpr auto cpu_kernel = &ViaActiveTable<typename MemberType<decltype(M)>::type>::template call<M>;

// ---- build facts and testing knobs -------------------------------------------------

std::string cpu_isa() { return active_cpu_isa(); }
std::string set_cpu_isa(std::string isa) { return use_cpu_kernels(isa); }
std::vector<std::string> cpu_isas() { return offered_cpu_isas(); }
void cache_clear() { buffer_cache_clear(); }

}  // namespace

TORCH_LIBRARY(linclass, m) {
  // Fused class-index losses.  They return (loss, grad): `grad` is d loss / d input for
  // grad_output = 1, computed in the same pass as the loss when compute_grad is true
  // (an empty tensor otherwise); backward only rescales it.  `reduction` uses
  // at::Reduction's codes (0 none, 1 mean, 2 sum).
  m.def(
      "cross_entropy(Tensor input, Tensor target, Tensor? weight, int ignore_index, "
      "float label_smoothing, int reduction, bool compute_grad) -> (Tensor, Tensor)");
  m.def(
      "multi_margin_loss(Tensor input, Tensor target, int p, float margin, Tensor? weight, "
      "int reduction, bool compute_grad) -> (Tensor, Tensor)");

  // Fused linear + loss (linear_blocks.h): loss(input @ weight.T + bias, target) and
  // (grad_input, grad_weight, grad_bias) for grad_output = 1, each only where
  // output_mask asks for it (else an empty tensor).  'mean' and 'sum' only.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target, "
      "int ignore_index, float label_smoothing, int reduction, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_multi_margin_loss(Tensor input, Tensor weight, Tensor? bias, Tensor target, int p, "
      "float margin, int reduction, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

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

  // The CPU kernels' ISA: the active one, switching it, the loaded ones (cpu/ops.h).
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_set_cpu_isa(str isa) -> str", &set_cpu_isa);
  m.def("_cpu_isas() -> str[]", &cpu_isas);
  // The CPU gradient-buffer cache (buffer_cache.h) and a testing knob.
  m.def("_buffer_cache_clear() -> ()", &cache_clear);
  m.def("_buffer_cache_stats() -> int[]", &buffer_cache_stats);
  m.def("_linear_block_rows(int rows) -> int", &set_linear_block_rows);
}

TORCH_LIBRARY_IMPL(linclass, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("multi_margin_loss", &multi_margin_loss_autograd);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
  m.impl("linear_multi_margin_loss", &linear_multi_margin_loss_autograd);
}

TORCH_LIBRARY_IMPL(linclass, CPU, m) {
  m.impl("cross_entropy", cpu_kernel<&CpuKernels::cross_entropy>);
  m.impl("multi_margin_loss", cpu_kernel<&CpuKernels::multi_margin_loss>);
  m.impl("linear_cross_entropy", cpu_kernel<&CpuKernels::linear_cross_entropy>);
  m.impl("linear_multi_margin_loss", cpu_kernel<&CpuKernels::linear_multi_margin_loss>);
  m.impl("linear_sgd_step", cpu_kernel<&CpuKernels::sgd_step>);
  m.impl("linear_sgd_sweep_step", cpu_kernel<&CpuKernels::sgd_sweep_step>);
  m.impl("_ce_shard_stats", cpu_kernel<&CpuKernels::ce_shard_stats>);
  m.impl("_ce_shard_grad", cpu_kernel<&CpuKernels::ce_shard_grad>);
  m.impl("_mm_shard_grad", cpu_kernel<&CpuKernels::mm_shard_grad>);
}

#ifdef LINCLASS_WITH_CUDA
TORCH_LIBRARY_IMPL(linclass, CUDA, m) {
  m.impl("cross_entropy", &cross_entropy_cuda);
  m.impl("multi_margin_loss", &multi_margin_loss_cuda);
  m.impl("linear_cross_entropy", &linear_cross_entropy_cuda);
  m.impl("linear_multi_margin_loss", &linear_multi_margin_loss_cuda);
}
#endif

}  // namespace linclass
