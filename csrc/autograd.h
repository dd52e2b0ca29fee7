// Autograd of the C++ fused ops, once for all of them and every device; csrc/ops.cpp
// registers it for each op (the Autograd dispatch key).
//
// A fused op returns (loss, grad) where grad = d loss / d input for grad_output = 1,
// computed by the forward kernel.  Backward only rescales that buffer by grad_output
// (per row for reduction='none'), in place unless the graph is kept for another
// backward (see rescale): a forward + backward then allocates one N x C buffer in all.
// In C++ rather than torch.library.register_autograd: the Python route's schema walk,
// autograd.Function and Python backward node cost more host time per call than the
// kernels of a small loss.  The Triton ops' twin is in linclass/_ops.py.
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>

#include <array>
#include <tuple>

namespace linclass {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// saved * grad_loss, where `saved` is a gradient the forward computed for
// grad_output = 1 (mirrors _rescale in linclass/_ops.py).  The buffer itself is handed
// to autograd, which adopts it as .grad when it can, unless the graph is kept for
// another backward (retain_graph=True), which must find it unchanged: then the result
// is a new tensor.  CUDA scales in place on the device (csrc/cuda/scale.cu: nothing is
// done when grad_output is 1, and the host never waits for the GPU); on the CPU reading
// grad_output is free.  Fake, functional and other subclass tensors (torch.compile's
// tracing) take an ordinary multiply.
at::Tensor rescale(const at::Tensor& saved, const at::Tensor& grad_loss);

// d loss / d input from the saved gradient: for 'none' one grad_output per row,
// broadcast over the classes (dim 1); else one scalar.
at::Tensor saved_grad_backward(const at::Tensor& grad, at::Tensor grad_loss, int64_t reduction,
                               int64_t input_dim);

// Raises the "differentiable once" error inside a backward with create_graph=True.
void check_first_order();

// Fused loss ops share the signature (input, target, ..., int reduction, bool compute_grad)
// -> (loss, grad).  Their backward node is written by hand, as torch's generated
// ones are, rather than through torch::autograd::Function: the generic Function path
// (its context map, output wrapping, locked apply) costs about as much host time as the
// whole 4 x 10 loss.  Only `input` is differentiable.
struct FusedLossBackward : public torch::autograd::Node {
  torch::autograd::SavedVariable grad;  // d loss / d input for grad_output = 1
  int64_t reduction = 0, input_dim = 0;
  bool compute_grad = false;

  variable_list apply(variable_list&& grads) override;
  void release_variables() override { grad.reset_data(); }
  std::string name() const override { return "linclass::FusedLossBackward"; }
};

// How this torch holds autograd nodes: std::shared_ptr before 2.13, c10::intrusive_ptr
// since (the pointer type of Edge::function).
template <typename Handle>
struct NodeHolder;
template <>
struct NodeHolder<std::shared_ptr<torch::autograd::Node>> {
  template <typename T>
  using Ptr = std::shared_ptr<T>;
  template <typename T>
  static Ptr<T> make() { return std::make_shared<T>(); }
};
template <>
struct NodeHolder<c10::intrusive_ptr<torch::autograd::Node>> {
  template <typename T>
  using Ptr = c10::intrusive_ptr<T>;
  template <typename T>
  static Ptr<T> make() { return c10::make_intrusive<T>(); }
};
using Nodes = NodeHolder<decltype(torch::autograd::Edge::function)>;
using FusedLossNode = Nodes::Ptr<FusedLossBackward>;

// The node for a call whose `input` requires grad (else null), with its edge to input.
FusedLossNode fused_loss_node(const at::Tensor& input);
// Attaches the op's results to the node: loss gets it as grad_fn, grad is saved.
void record_fused_loss(const FusedLossNode& node, const at::Tensor& input,
                       at::Tensor& loss, const at::Tensor& grad, int64_t reduction,
                       bool compute_grad);

// Fused linear + loss ops: (input, weight, bias?, target, ..., int reduction,
// bool[3] output_mask) -> (loss, grad_input, grad_weight, grad_bias), gradients for
// grad_output = 1.  Backward rescales each by the (scalar) grad_output.
template <typename... Args>
struct FusedLinearLoss : public torch::autograd::Function<FusedLinearLoss<Args...>> {
  using Out = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;
  using Op = c10::TypedOperatorHandle<Out(Args...)>;
  static constexpr size_t kArgs = sizeof...(Args);

  static variable_list forward(AutogradContext* ctx, const Op* op, Args... args) {
    const auto all = std::forward_as_tuple(args...);
    const std::array<bool, 3> mask = std::get<kArgs - 1>(all);
    const std::optional<at::Tensor>& bias = std::get<2>(all);
    // A tensor that takes a gradient the forward did not compute is an error at backward.
    ctx->saved_data["missing"] = (std::get<0>(all).requires_grad() && !mask[0]) ||
                                 (std::get<1>(all).requires_grad() && !mask[1]) ||
                                 (bias && bias->requires_grad() && !mask[2]);
    ctx->saved_data["mask"] = std::vector<bool>(mask.begin(), mask.end());
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, gx, gw, gb] = op->call(args...);
    ctx->save_for_backward({gx, gw, gb});
    ctx->mark_non_differentiable({gx, gw, gb});
    ctx->set_materialize_grads(false);
    return {loss, gx, gw, gb};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(1 + kArgs);  // the op handle, then one per op argument
    const at::Tensor& grad_loss = grads[0];
    if (!grad_loss.defined()) return out;
    check_first_order();
    TORCH_CHECK(!ctx->saved_data["missing"].toBool(),
                "linclass: this fused linear loss ran without the gradient of an argument that "
                "requires one (output_mask); call it through linclass.linear_cross_entropy / "
                "linear_multi_margin_loss, which set the mask from requires_grad");
    const auto saved = ctx->get_saved_variables();
    const auto mask = ctx->saved_data["mask"].toBoolList();
    for (size_t i = 0; i < 3; ++i)  // input, weight, bias are the op's first arguments
      if (mask[i]) out[1 + i] = rescale(saved[i], grad_loss);
    return out;
  }
};

// The typed handle of op `name`.  Each caller keeps its own in a function-local static:
// ops with the same signature share a template instantiation, so the handle cannot
// live in the template.
template <typename Sig>
c10::TypedOperatorHandle<Sig> typed_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").template typed<Sig>();
}

template <typename... Args, typename... Values>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> fused_linear_loss_autograd(
    const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(Args...)>& op,
    Values&&... values) {
  auto out = FusedLinearLoss<Args...>::apply(&op, std::forward<Values>(values)...);
  return {out[0], out[1], out[2], out[3]};
}

// The Autograd kernel of a fused loss op: args are the op's arguments, input first,
// reduction and compute_grad last.
template <typename... Args, typename... Values>
std::tuple<at::Tensor, at::Tensor> fused_loss_autograd(
    const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(Args...)>& op,
    Values&&... values) {
  const auto all = std::forward_as_tuple(values...);
  const at::Tensor& input = std::get<0>(all);
  auto node = fused_loss_node(input);
  auto result = [&] {
    at::AutoDispatchBelowADInplaceOrView guard;
    return op.call(values...);
  }();
  if (node)
    record_fused_loss(node, input, std::get<0>(result), std::get<1>(result),
                      std::get<sizeof...(Args) - 2>(all), std::get<sizeof...(Args) - 1>(all));
  return result;
}

}  // namespace linclass
