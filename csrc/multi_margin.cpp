// linclass::multi_margin_loss on CPU: checks, target scan, then the fused row kernel
// (cpu/multi_margin_kernel.h) over all rows in parallel.
#include "buffer_cache.h"
#include "common.h"
#include "cpu/multi_margin_kernel.h"
#include "cpu/op_support.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

namespace linclass {

std::tuple<at::Tensor, at::Tensor> multi_margin_loss_cpu(const at::Tensor& input,
                                                         const at::Tensor& target_, int64_t p,
                                                         double margin,
                                                         const std::optional<at::Tensor>& weight,
                                                         int64_t reduction, bool compute_grad) {
  check_multi_margin_args(input, target_, p, weight, reduction);
  const auto geom = *row_geometry(input);  // 2-D inputs always have a geometry
  const at::Tensor target = target_.contiguous();
  const int64_t rows = geom.rows(), C = geom.classes;

  at::Tensor loss = empty_loss(input, target, reduction);
  at::Tensor grad = compute_grad ? empty_cached(input.sizes(), input.scalar_type())
                                 : at::empty({0}, input.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "multi_margin_loss_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const std::vector<acc_t> w = cpu::class_weights<scalar_t>(weight, C);
    std::vector<acc_t> lane_targets(cpu::use_lanes(C) ? rows : 0);
    const auto scan = cpu::scan_targets<acc_t>(target.const_data_ptr<int64_t>(), rows, C, false, 0,
                                               nullptr,
                                               lane_targets.empty() ? nullptr : lane_targets.data());
    TORCH_CHECK(scan.first_bad < 0, "multi_margin_loss: target",
                cpu::index_string(scan.first_bad, target.sizes()), " = ",
                scan.first_bad >= 0 ? target.data_ptr<int64_t>()[scan.first_bad] : 0,
                " is out of range for ", C, " classes (expected 0 <= target < ", C, ")");
    // torch divides the 'mean' of this loss by the number of rows, whatever the weights.
    const double denom = reduction == kMean ? double(rows) : 1.0;

    cpu::MultiMarginParams<acc_t> prm{w.data(), weight.has_value(), acc_t(margin), acc_t(1.0 / denom), p, C};
    cpu::run_loss<scalar_t, cpu::MultiMarginMath>(input, geom, target, lane_targets.data(),
                                                  reduction, denom, compute_grad, loss, grad, prm);
  });
  return {loss, grad};
}

TORCH_LIBRARY_IMPL(linclass, CPU, m) { m.impl("multi_margin_loss", &multi_margin_loss_cpu); }

}  // namespace linclass
