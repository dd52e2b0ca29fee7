// The linclass operator library: schemas of every op (the per-device kernels register
// against them in cross_entropy.cpp, multi_margin.cpp and cuda/*.cu), plus the Python
// module stub that loads this shared object.
#include <Python.h>

#include <torch/library.h>

#include "buffer_cache.h"
#include "common.h"

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

std::string cpu_isa() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "default";
#endif
}

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

  // Fused linear + loss (linear_loss.cpp): loss(input @ weight.T + bias, target) and
  // (grad_input, grad_weight, grad_bias) for grad_output = 1, each only where
  // output_mask asks for it (else an empty tensor).  'mean' and 'sum' only.
  m.def(
      "linear_cross_entropy(Tensor input, Tensor weight, Tensor? bias, Tensor target, "
      "int ignore_index, float label_smoothing, int reduction, bool[3] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "linear_multi_margin_loss(Tensor input, Tensor weight, Tensor? bias, Tensor target, int p, "
      "float margin, int reduction, bool[3] output_mask) -> (Tensor, Tensor, Tensor, Tensor)");

  // One SGD step of the classic linear classifier (linear_sgd.cpp, CPU float32): the
  // weight, stored (C, D), is updated in place; returns the minibatch loss.
  m.def(
      "linear_sgd_step(Tensor input, Tensor(a!) weight, Tensor target, Tensor index, "
      "int loss, float learning_rate, float reg) -> float");
  // One step of K such runs side by side (linclass.sweep): weight (D, K * C), updated in
  // place; decay and grad_scale hold one factor per column.
  m.def(
      "linear_sgd_sweep_step(Tensor input, Tensor(a!) weight, Tensor target, Tensor index, "
      "int loss, int runs, Tensor decay, Tensor grad_scale) -> ()");

  // The autograd of a fused loss computed outside this library (the Triton kernels):
  // `loss` with a backward that rescales the saved `grad` (autograd.cpp).
  m.def("_with_saved_grad(Tensor input, Tensor(a) loss, Tensor grad, int reduction) -> Tensor(a)");

  // Build facts, the CPU gradient-buffer cache (see buffer_cache.h), testing knobs.
  m.def("_cpu_isa() -> str", &cpu_isa);
  m.def("_buffer_cache_clear() -> ()", &cache_clear);
  m.def("_buffer_cache_stats() -> int[]", &buffer_cache_stats);
  m.def("_linear_block_rows(int rows) -> int", &set_linear_block_rows);
}

}  // namespace linclass
