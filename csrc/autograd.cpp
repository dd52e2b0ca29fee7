#include "autograd.h"

#include "common.h"

#include <ATen/ops/mul.h>
#include <torch/csrc/autograd/functions/utils.h>
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
    // A float grad_output is read directly: item() is a dispatcher call, which costs as
    // much as the rest of a tiny loss's backward.
    const double g = grad_loss.scalar_type() == at::kFloat ? double(*grad_loss.const_data_ptr<float>())
                                                           : grad_loss.item<double>();
    if (g != 1.0) saved.mul_(grad_loss);
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

variable_list FusedLossBackward::apply(variable_list&& grads) {
  variable_list out(1);
  if (!grads[0].defined()) return out;
  TORCH_CHECK(compute_grad,
              "linclass: this fused loss ran with compute_grad=False, so it saved no gradient; "
              "call it through linclass.cross_entropy / linclass.multi_margin_loss, which set "
              "compute_grad when the input requires grad");
  if (should_compute_output(0))
    out[0] = saved_grad_backward(grad.unpack(), grads[0], reduction, input_dim);
  return out;
}

FusedLossNode fused_loss_node(const at::Tensor& input) {
  // The node carries no forward derivative: a dual input must fail, not lose its tangent.
  TORCH_CHECK_NOT_IMPLEMENTED(!torch::autograd::isFwGradDefined(input),
                              "linclass: the fused losses do not support forward-mode AD; use "
                              "linclass.backends.use('torch') for jvp");
  if (!torch::autograd::compute_requires_grad(input)) return FusedLossNode();
  auto node = Nodes::make<FusedLossBackward>();
  node->set_next_edges(torch::autograd::collect_next_edges(input));
  return node;
}

void record_fused_loss(const FusedLossNode& node, const at::Tensor& input,
                       at::Tensor& loss, const at::Tensor& grad, int64_t reduction,
                       bool compute_grad) {
  torch::autograd::set_history(loss, decltype(torch::autograd::Edge::function)(node));
  node->grad = torch::autograd::SavedVariable(grad, /*is_output=*/false);
  node->reduction = reduction;
  node->input_dim = input.dim();
  node->compute_grad = compute_grad;
}

}  // namespace linclass
