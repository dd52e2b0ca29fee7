// Autograd for the fused loss ops (and the fused linear + loss ops), once for all of
// them and every device.
//
// A fused op returns (loss, grad) where grad = d loss / d input for grad_output = 1,
// computed by the forward kernel.  Backward only rescales that buffer by grad_output
// (per row for reduction='none'), in place unless the graph is kept for another
// backward (see rescale): a forward+backward then allocates one N x C buffer in all.
//
// This is registered in C++ (the Autograd dispatch key) rather than with
// torch.library.register_autograd: the Python path costs ~120 us per call on the
// development machine (schema walk + Python autograd.Function + Python backward
// node), which is more than the kernels themselves at small batch sizes.  Shapes
// (register_fake) stay in Python, in linclass/_ops.py.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mul.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <torch/csrc/autograd/graph_task.h>

#ifdef LINCLASS_WITH_CUDA
#include "cuda/scale.h"
#endif

namespace linclass {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kNone = 0;

// saved * grad_loss, where `saved` is a gradient the forward computed for
// grad_output = 1 (mirrors _rescale in linclass/_ops.py).  The buffer itself is handed
// to autograd, which adopts it as .grad when it can, unless the graph is kept for
// another backward (retain_graph=True), which must find it unchanged: then the result
// is a new tensor.  CUDA scales in place on the device (csrc/cuda/scale.cu: nothing is
// done when grad_output is 1, and the host never waits for the GPU); on the CPU reading
// grad_output is free.  Fake, functional and other subclass tensors (torch.compile's
// tracing) take an ordinary multiply.
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
  TORCH_CHECK(!at::GradMode::is_enabled(),
              "linclass: the fused losses are differentiable once; backward with "
              "create_graph=True (double backward) is not supported. Use "
              "linclass.backends.use('torch') for higher-order gradients.");
  if (reduction == kNone && input_dim >= 2) grad_loss = grad_loss.unsqueeze(1);
  return rescale(grad, grad_loss);
}

// Fused loss ops share the signature (input, target, ..., int reduction, bool compute_grad)
// -> (loss, grad); Args are the op's argument types.
template <typename... Args>
struct FusedLoss : public torch::autograd::Function<FusedLoss<Args...>> {
  using Op = c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(Args...)>;
  static constexpr size_t kArgs = sizeof...(Args);

  static variable_list forward(AutogradContext* ctx, const Op* op, Args... args) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [loss, grad] = op->call(args...);
    const auto all = std::forward_as_tuple(args...);
    ctx->saved_data["input_dim"] = std::get<0>(all).dim();
    ctx->saved_data["reduction"] = std::get<kArgs - 2>(all);
    ctx->saved_data["compute_grad"] = std::get<kArgs - 1>(all);
    ctx->save_for_backward({grad});
    ctx->mark_non_differentiable({grad});
    ctx->set_materialize_grads(false);
    return {loss, grad};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(1 + kArgs);  // the op handle, then one per op argument
    at::Tensor grad_loss = grads[0];
    if (!grad_loss.defined()) return out;
    TORCH_CHECK(ctx->saved_data["compute_grad"].toBool(),
                "linclass: this fused loss ran with compute_grad=False, so it saved no gradient; "
                "call it through linclass.cross_entropy / linclass.multi_margin_loss, which set "
                "compute_grad when the input requires grad");
    out[1] = saved_grad_backward(ctx->get_saved_variables()[0], grad_loss,
                                 ctx->saved_data["reduction"].toInt(), ctx->saved_data["input_dim"].toInt());
    return out;
  }
};

// The autograd of a fused loss whose kernels ran elsewhere (the Triton launchers, in
// Python): _with_saved_grad(input, loss, grad, reduction) returns `loss` as a tensor
// whose backward is FusedLoss's, with `grad` saved.  A C++ graph node instead of a
// Python autograd.Function: on an H200's host the Python node's backward (run by the
// engine on the device thread, under the GIL) was a large part of a small loss's time
// (torch.profiler).
struct SavedGrad : public torch::autograd::Function<SavedGrad> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& input, const at::Tensor& loss,
                            const at::Tensor& grad, int64_t reduction) {
    ctx->saved_data["input_dim"] = input.dim();
    ctx->saved_data["reduction"] = reduction;
    ctx->save_for_backward({grad});
    ctx->set_materialize_grads(false);
    return loss.alias();
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list out(4);  // input, loss, grad, reduction
    if (!grads[0].defined()) return out;
    out[0] = saved_grad_backward(ctx->get_saved_variables()[0], grads[0],
                                 ctx->saved_data["reduction"].toInt(), ctx->saved_data["input_dim"].toInt());
    return out;
  }
};

at::Tensor with_saved_grad_autograd(const at::Tensor& input, const at::Tensor& loss, const at::Tensor& grad,
                                    int64_t reduction) {
  return SavedGrad::apply(input, loss, grad, reduction);
}

// Below autograd (no input needs a gradient): the loss itself.
at::Tensor with_saved_grad(const at::Tensor&, const at::Tensor& loss, const at::Tensor&, int64_t) {
  return loss.alias();
}

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
    TORCH_CHECK(!at::GradMode::is_enabled(),
                "linclass: the fused losses are differentiable once; backward with "
                "create_graph=True (double backward) is not supported.");
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

template <typename... Args, typename... Values>
std::tuple<at::Tensor, at::Tensor> fused_loss_autograd(
    const c10::TypedOperatorHandle<std::tuple<at::Tensor, at::Tensor>(Args...)>& op,
    Values&&... values) {
  auto out = FusedLoss<Args...>::apply(&op, std::forward<Values>(values)...);
  return {out[0], out[1]};
}

using OptTensor = const std::optional<at::Tensor>&;

std::tuple<at::Tensor, at::Tensor> cross_entropy_autograd(const at::Tensor& input,
                                                          const at::Tensor& target, OptTensor weight,
                                                          int64_t ignore_index, double label_smoothing,
                                                          int64_t reduction, bool compute_grad) {
  using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, OptTensor,
                                                 int64_t, double, int64_t, bool);
  static const auto op = typed_op<Sig>("linclass::cross_entropy");
  return fused_loss_autograd(op, input, target, weight, ignore_index, label_smoothing, reduction,
                             compute_grad);
}

std::tuple<at::Tensor, at::Tensor> multi_margin_loss_autograd(const at::Tensor& input,
                                                              const at::Tensor& target, int64_t p,
                                                              double margin, OptTensor weight,
                                                              int64_t reduction, bool compute_grad) {
  using Sig = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t,
                                                 double, OptTensor, int64_t, bool);
  static const auto op = typed_op<Sig>("linclass::multi_margin_loss");
  return fused_loss_autograd(op, input, target, p, margin, weight, reduction, compute_grad);
}

using Mask = std::array<bool, 3>;
// Both linear ops: (input, weight, bias, target, int, float, int reduction, bool[3] mask).
using LinearSig = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, OptTensor, const at::Tensor&, int64_t, double, int64_t,
    Mask);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_cross_entropy_autograd(
    const at::Tensor& input, const at::Tensor& weight, OptTensor bias, const at::Tensor& target,
    int64_t ignore_index, double label_smoothing, int64_t reduction, Mask mask) {
  static const auto op = typed_op<LinearSig>("linclass::linear_cross_entropy");
  return fused_linear_loss_autograd(op, input, weight, bias, target, ignore_index, label_smoothing,
                                    reduction, mask);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> linear_multi_margin_loss_autograd(
    const at::Tensor& input, const at::Tensor& weight, OptTensor bias, const at::Tensor& target,
    int64_t p, double margin, int64_t reduction, Mask mask) {
  static const auto op = typed_op<LinearSig>("linclass::linear_multi_margin_loss");
  return fused_linear_loss_autograd(op, input, weight, bias, target, p, margin, reduction, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(linclass, Autograd, m) {
  m.impl("cross_entropy", &cross_entropy_autograd);
  m.impl("multi_margin_loss", &multi_margin_loss_autograd);
  m.impl("linear_cross_entropy", &linear_cross_entropy_autograd);
  m.impl("linear_multi_margin_loss", &linear_multi_margin_loss_autograd);
  m.impl("_with_saved_grad", &with_saved_grad_autograd);
}

TORCH_LIBRARY_IMPL(linclass, CompositeExplicitAutograd, m) {
  m.impl("_with_saved_grad", &with_saved_grad);
}

}  // namespace linclass
