// linclass::multi_margin_loss on CPU: checks, target scan, then the fused row kernel
// (multi_margin.h: the math) over all rows in parallel (row_driver.h).
#include "cpu/ops.h"

#include "buffer_cache.h"
#include "common.h"
#include "multi_margin.h"


namespace linclass {

std::tuple<Tensor, Tensor> multi_margin_loss_cpu(const Tensor& input,
                                                         const Tensor& target_, int64_t p,
                                                         double margin,
                                                         const OptTensor& weight,
                                                         int64_t reduction, bool compute_grad) {
  check_multi_margin_args(input, target_, p, weight, reduction);
  // 2-D inputs always have a geometry
  const RowGeometry geom = cpu::canonical_rows(*row_geometry(input));
  const Tensor target = as_contiguous(target_);
  const int64_t C = geom.classes;

  Tensor loss = empty_loss(input, target, reduction);
  Tensor grad = compute_grad ? empty_cached_like(input) : empty_none(input);

  LINCLASS_DISPATCH_FLOATING(input.scalar_type(), "multi_margin_loss_cpu", [&] {
    const cpu::MultiMarginSetup<scalar_t> setup(target, weight, C, p, margin, reduction,
                                                  /*in_kernel=*/true, &geom);
    cpu::run_loss<scalar_t, cpu::MultiMarginMath>(input, geom, target, setup.plan,
                                                  reduction, setup.denom, compute_grad, loss, grad,
                                                  setup.params);
  });
  return {loss, grad};
}

}  // namespace linclass
