// The CPU entry points of linclass's ops, one file per op family beside this header.
//
// Everything in csrc/cpu/ is compiled once per vector ISA (AVX-512, AVX2, x86-64
// baseline), each into its own module linclass._cpu_<isa> (module.cpp), because one
// binary cannot hold code for several ISAs without the risk that an inline function
// compiled for the widest one is the copy every caller gets.  A module hands its
// entry points to linclass._C as a CpuKernels table when it is imported; csrc/ops.cpp
// registers every CPU op once, calling through the active table (DispatchStub's idea,
// chosen at load by linclass/_extension.py and switchable for tests).
#pragma once


#include "tensor_ops.h"

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace linclass {

// cpu/cross_entropy.cpp
std::tuple<Tensor, Tensor> cross_entropy_cpu(const Tensor& input, const Tensor& target,
                                                     const OptTensor& weight,
                                                     int64_t ignore_index, double label_smoothing,
                                                     int64_t reduction, bool compute_grad);

// cpu/cross_entropy_probs.cpp: against class probabilities (a float target).
std::tuple<Tensor, Tensor> cross_entropy_probs_cpu(const Tensor& input, const Tensor& target,
                                                   const OptTensor& weight, double label_smoothing,
                                                   int64_t reduction, bool compute_grad);

// cpu/multi_margin.cpp
std::tuple<Tensor, Tensor> multi_margin_loss_cpu(const Tensor& input, const Tensor& target,
                                                         int64_t p, double margin,
                                                         const OptTensor& weight,
                                                         int64_t reduction, bool compute_grad);

// cpu/linear_loss.cpp
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_cross_entropy_cpu(
    const Tensor& input, const Tensor& weight, const OptTensor& bias,
    const Tensor& target, int64_t ignore_index, double label_smoothing, int64_t reduction,
    std::array<bool, 3> output_mask);
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_multi_margin_loss_cpu(
    const Tensor& input, const Tensor& weight, const OptTensor& bias,
    const Tensor& target, int64_t p, double margin, int64_t reduction,
    std::array<bool, 3> output_mask);

// cpu/linear_sgd.cpp
double linear_sgd_step(const Tensor& input, const Tensor& weight, const Tensor& target,
                       const Tensor& index, int64_t loss, double learning_rate, double reg);
void linear_sgd_sweep_step(const Tensor& input, const Tensor& weight, const Tensor& target,
                           const Tensor& index, int64_t loss, int64_t runs,
                           const Tensor& decay, const Tensor& grad_scale);

// cpu/sharded.cpp: the phases of the class-sharded losses (linclass/_sharded.py).
Tensor ce_shard_stats_cpu(const Tensor& x, const Tensor& target, int64_t start,
                              const OptTensor& weight, bool smoothing,
                              int64_t ignore_index);
Tensor ce_shard_grad_cpu(const Tensor& x, const Tensor& target, int64_t start,
                             const OptTensor& weight, const Tensor& shift,
                             const Tensor& exp_coef, const Tensor& weight_coef,
                             const Tensor& target_grad, int64_t ignore_index,
                             const OptTensor& out);
std::tuple<Tensor, Tensor> mm_shard_grad_cpu(const Tensor& x, const Tensor& target,
                                                     int64_t start, const Tensor& x_y,
                                                     const Tensor& row_coef, int64_t p,
                                                     double margin, bool compute_grad);
Tensor ce_probs_shard_stats_cpu(const Tensor& x, const Tensor& target, const OptTensor& weight,
                                double label_smoothing, int64_t classes);
Tensor ce_probs_shard_grad_cpu(const Tensor& x, const Tensor& target, const OptTensor& weight,
                               double label_smoothing, int64_t classes, const Tensor& shift,
                               const Tensor& exp_coef, double scale);

// One ISA's build of the entry points above.
struct CpuKernels {
  const char* isa;  // "avx512", "avx2" or "default"
  decltype(&cross_entropy_cpu) cross_entropy;
  decltype(&cross_entropy_probs_cpu) cross_entropy_probs;
  decltype(&multi_margin_loss_cpu) multi_margin_loss;
  decltype(&linear_cross_entropy_cpu) linear_cross_entropy;
  decltype(&linear_multi_margin_loss_cpu) linear_multi_margin_loss;
  decltype(&linear_sgd_step) sgd_step;
  decltype(&linear_sgd_sweep_step) sgd_sweep_step;
  decltype(&ce_shard_stats_cpu) ce_shard_stats;
  decltype(&ce_shard_grad_cpu) ce_shard_grad;
  decltype(&mm_shard_grad_cpu) mm_shard_grad;
  decltype(&ce_probs_shard_stats_cpu) ce_probs_shard_stats;
  decltype(&ce_probs_shard_grad_cpu) ce_probs_shard_grad;
};

// csrc/cpu_dispatch.cpp (in linclass._C).  A module offers its table through
// linclass_offer_cpu_kernels (shared_state.h); the first one offered becomes active
// until use_cpu_kernels names another.
// The active table; raises a clear error when no CPU kernel module is loaded.
const CpuKernels& active_cpu_kernels();
// Makes the table of that ISA active (it must have been offered); returns the previous
// active ISA's name ("" when none was).
std::string use_cpu_kernels(const std::string& isa);
// Name of the active ISA ("" when no module is loaded) and of every offered one.
std::string active_cpu_isa();
std::vector<std::string> offered_cpu_isas();

}  // namespace linclass
