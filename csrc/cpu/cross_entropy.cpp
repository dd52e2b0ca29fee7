// linclass::cross_entropy on CPU: checks, target scan, then the fused row kernel
// (cross_entropy.h: the math) over all rows in parallel (row_driver.h).
#include "cpu/ops.h"

#include "buffer_cache.h"
#include "common.h"
#include "cross_entropy.h"


namespace linclass {

std::tuple<Tensor, Tensor> cross_entropy_cpu(const Tensor& input_,
                                                     const Tensor& target_,
                                                     const OptTensor& weight,
                                                     int64_t ignore_index, double label_smoothing,
                                                     int64_t reduction, bool compute_grad) {
  check_cross_entropy_args(input_, target_, weight, label_smoothing, reduction);
  const auto [input, rows] = rows_of(input_);
  const RowGeometry geom = cpu::canonical_rows(rows);
  const Tensor target = as_contiguous(target_);
  const int64_t C = geom.classes;

  Tensor loss = empty_loss(input, target, reduction);
  Tensor grad = compute_grad ? empty_cached_like(input_) : empty_none(input);

  LINCLASS_DISPATCH_FLOATING(input.scalar_type(), "cross_entropy_cpu", [&] {
    const cpu::CrossEntropySetup<scalar_t> setup(target, weight, C, ignore_index, label_smoothing,
                                                 reduction, /*in_kernel=*/true, &geom);
    cpu::run_loss<scalar_t, cpu::CrossEntropyMath>(input, geom, target, setup.plan,
                                                   reduction, setup.denom, compute_grad, loss,
                                                   grad, setup.params);
  });
  return {loss, grad};
}

}  // namespace linclass
