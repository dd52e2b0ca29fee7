#include "autograd.h"

#include "common.h"

#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/graph_task.h>

#ifdef LINCLASS_WITH_CUDA
#include "cuda/scale.h"
#endif

namespace linclass {

void check_first_order() {
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "linclass: the fused losses are differentiable once; backward with "
              "create_graph=True (double backward) is not supported. Use "
              "linclass.backends.use('torch') for higher-order gradients.");
}

at::Tensor rescale(const at::Tensor& saved, const at::Tensor& grad_loss) {
  constexpr auto kTracing = c10::DispatchKeySet(
      {c10::DispatchKey::Python, c10::DispatchKey::Functionalize, c10::DispatchKey::PythonTLSSnapshot});
  if (grad_loss.key_set().has_any(kTracing) || torch::autograd::get_current_graph_task_keep_graph() ||
      grad_loss.numel() != 1)
    return at::mul(saved, grad_loss);
#ifdef LINCLASS_WITH_CUDA
  if (grad_loss.is_cuda() && saved.is_cuda()) {
    cuda::scale_inplace(saved, grad_loss);
    return saved;
  }
#endif
  if (grad_loss.is_cpu() && saved.is_cpu()) {
    if (grad_loss.item<double>() != 1.0) saved.mul_(grad_loss);
    return saved;
  }
  return at::mul(saved, grad_loss);
}

// d loss / d input from the saved gradient: for 'none' one grad_output per row,
// broadcast over the classes (dim 1); else one scalar.
at::Tensor saved_grad_backward(const at::Tensor& grad, at::Tensor grad_loss, int64_t reduction,
                               int64_t input_dim) {
  check_first_order();
  if (reduction == kNone && input_dim >= 2) grad_loss = grad_loss.unsqueeze(1);
  return rescale(grad, grad_loss);
}


}  // namespace linclass
