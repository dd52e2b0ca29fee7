// The loss of a fused op from its per-row losses, in one launch (csrc/cuda/reduce.cu).
#pragma once

#include "../tensor_ops.h"

namespace linclass::cuda {

// sum(loss_rows) / divisor as a 0-dim tensor of loss_rows' dtype (the accumulation
// dtype, which the ops return their loss in), where divisor is *divisor_dev (a device
// scalar of that dtype, e.g. the 'mean' denominator that consts_kernel wrote) when it is
// given, else divisor_host.  One block sums the rows in a fixed order (deterministic):
// one launch instead of two (sum, div), which is what the op costs at small N.  Long
// inputs go to aten::sum.
Tensor reduce_rows(const Tensor& loss_rows, const Tensor* divisor_dev, double divisor_host);

}  // namespace linclass::cuda
