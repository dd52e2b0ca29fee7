// The Python module linclass._cpu_<isa>: this folder's kernels compiled for one vector
// ISA (setup.py passes LINCLASS_ISA and the matching compiler flags).  Importing it
// offers its entry points to linclass._C (cpu/ops.h); it defines nothing else.
#include <Python.h>

#include "cpu/ops.h"
#include "shared_state.h"

#ifndef LINCLASS_ISA
#error "compile csrc/cpu/ with -DLINCLASS_ISA=<avx512|avx2|default> (see setup.py)"
#endif

#define LINCLASS_STR_(x) #x
#define LINCLASS_STR(x) LINCLASS_STR_(x)
#define LINCLASS_CAT_(a, b) a##b
#define LINCLASS_CAT(a, b) LINCLASS_CAT_(a, b)

PyMODINIT_FUNC LINCLASS_CAT(PyInit__cpu_, LINCLASS_ISA)(void) {
  using namespace linclass;
  static const CpuKernels table{
      LINCLASS_STR(LINCLASS_ISA),
      &cross_entropy_cpu,
      &cross_entropy_probs_cpu,
      &multi_margin_loss_cpu,
      &linear_cross_entropy_cpu,
      &linear_multi_margin_loss_cpu,
      &linear_sgd_step,
      &linear_sgd_sweep_step,
      &ce_shard_stats_cpu,
      &ce_shard_grad_cpu,
      &mm_shard_grad_cpu,
      &ce_probs_shard_stats_cpu,
      &ce_probs_shard_grad_cpu,
  };
  if (linclass_offer_cpu_kernels(&table) != 0) {
    PyErr_SetString(PyExc_ImportError, "linclass: too many CPU kernel tables");
    return nullptr;
  }
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT,
                                        "_cpu_" LINCLASS_STR(LINCLASS_ISA), nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
