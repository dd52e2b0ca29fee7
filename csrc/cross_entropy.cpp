// linclass::cross_entropy on CPU: checks, target scan, then the fused row kernel
// (cpu/cross_entropy_kernel.h) over all rows in parallel.
#include "buffer_cache.h"
#include "common.h"
#include "cpu/cross_entropy_kernel.h"
#include "cpu/op_support.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace linclass {

std::tuple<at::Tensor, at::Tensor> cross_entropy_cpu(const at::Tensor& input_,
                                                     const at::Tensor& target_,
                                                     const std::optional<at::Tensor>& weight,
                                                     int64_t ignore_index, double label_smoothing,
                                                     int64_t reduction, bool compute_grad) {
  check_cross_entropy_args(input_, target_, weight, label_smoothing, reduction);
  const auto [input, geom] = rows_of(input_);
  const at::Tensor target = target_.contiguous();
  const int64_t rows = geom.rows(), C = geom.classes;

  at::Tensor loss = empty_loss(input, target, reduction);
  at::Tensor grad = compute_grad ? empty_cached(input.sizes(), input.scalar_type())
                                 : at::empty({0}, input.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "cross_entropy_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> w = cpu::class_weights<scalar_t>(weight, C);
    double weight_sum = 0;
    for (acc_t v : w) weight_sum += double(v);

    std::vector<acc_t> lane_targets(cpu::use_lanes(C) ? rows : 0);
    const auto scan = cpu::scan_targets<acc_t>(target.const_data_ptr<int64_t>(), rows, C, true,
                                               ignore_index, weight ? w.data() : nullptr,
                                               lane_targets.empty() ? nullptr : lane_targets.data());
    TORCH_CHECK_INDEX(scan.first_bad < 0, "cross_entropy: target",
                      cpu::index_string(scan.first_bad, target.sizes()), " = ",
                      scan.first_bad >= 0 ? target.data_ptr<int64_t>()[scan.first_bad] : 0,
                      " is out of bounds for ", C, " classes (expected 0 <= target < ", C,
                      " or target == ignore_index, which is ", ignore_index, ")");
    const double denom = reduction == kMean ? scan.weight_sum : 1.0;

    cpu::CrossEntropyParams<acc_t> p{w.data(),
                                     weight.has_value(),
                                     acc_t(weight_sum),
                                     acc_t(1.0 - label_smoothing),
                                     acc_t(C > 0 ? label_smoothing / double(C) : 0.0),
                                     acc_t(1.0 / denom),
                                     ignore_index,
                                     C};
    cpu::run_loss<scalar_t, cpu::CrossEntropyMath>(input, geom, target, lane_targets.data(),
                                                   reduction, denom, compute_grad, loss, grad, p);
  });
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(linclass, CPU, m) { m.impl("cross_entropy", &cross_entropy_cpu); }

}  // namespace linclass
