#include "common.h"


namespace linclass {

std::optional<RowGeometry> row_geometry(const Tensor& t) {
  RowGeometry g;
  if (t.dim() == 1) {
    g.classes = t.size(0);
    g.stride_c = t.stride(0);
    return g;
  }
  g.outer = t.size(0);
  g.classes = t.size(1);
  g.stride_n = t.stride(0);
  g.stride_c = t.stride(1);
  if (t.dim() == 2) return g;
  // Flatten d1..dk: they must form one strided run (stride(i) == size(i+1) * stride(i+1)),
  // ignoring size-1 dims whose stride is meaningless.  An empty tensor's strides are
  // meaningless too (and contiguous() keeps whatever they are): nothing is read.
  const bool empty = t.numel() == 0;
  int64_t inner = 1, stride_k = 1;
  bool first = true;
  for (int64_t d = t.dim() - 1; d >= 2; --d) {
    if (t.size(d) == 1 || empty) {
      inner *= t.size(d);
      continue;
    }
    if (first) {
      stride_k = t.stride(d);
      first = false;
    } else if (t.stride(d) != inner * stride_k) {
      return std::nullopt;
    }
    inner *= t.size(d);
  }
  for (int64_t d = 2; d < t.dim(); ++d)
    if (t.size(d) == 0) inner = 0;
  g.inner = inner;
  g.stride_k = stride_k;
  return g;
}

namespace {

// Class weights (one per class, the input's dtype and device) and the reduction code.
void check_weight_and_reduction(const char* op, const OptTensor& weight, const Tensor& input,
                                int64_t classes, int64_t reduction) {
  if (weight.has_value()) {
    LINCLASS_CHECK(weight->dim() == 1 && weight->size(0) == classes, op,
                ": weight must be a 1-D tensor with one entry per class (", classes,
                "), got shape ", shape_string(weight->sizes()));
    LINCLASS_CHECK(weight->scalar_type() == input.scalar_type(), op, ": weight dtype ",
                weight->scalar_type(), " does not match input dtype ", input.scalar_type());
    LINCLASS_CHECK(same_device(*weight, input), op, ": weight is on ", device_string(*weight),
                " but input is on ", device_string(input));
  }
  LINCLASS_CHECK(reduction == kNone || reduction == kMean || reduction == kSum, op,
              ": unknown reduction code ", reduction);
}

}  // namespace

void check_class_index_args(const char* op, const Tensor& input, const Tensor& target,
                            const OptTensor& weight, int64_t reduction) {
  LINCLASS_CHECK(is_floating(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  LINCLASS_CHECK(target.scalar_type() == ScalarType::Long, op, ": class-index target must be int64, got ",
              target.scalar_type());
  LINCLASS_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension");
  LINCLASS_CHECK(same_device(target, input), op, ": target is on ", device_string(target),
              " but input is on ", device_string(input));
  if (input.dim() == 1) {
    LINCLASS_CHECK(target.dim() == 0, op, ": a 1-D input needs a 0-D target, got shape ",
                shape_string(target.sizes()));
  } else {
    LINCLASS_CHECK(target.dim() == input.dim() - 1, op, ": target must have ", input.dim() - 1,
                " dims for input of shape ", shape_string(input.sizes()), ", got ", shape_string(target.sizes()));
    LINCLASS_CHECK(target.size(0) == input.size(0), op, ": input batch size ", input.size(0),
                " does not match target batch size ", target.size(0));
    for (int64_t d = 2; d < input.dim(); ++d)
      LINCLASS_CHECK(target.size(d - 1) == input.size(d), op, ": target shape ", shape_string(target.sizes()),
                  " does not match input shape ", shape_string(input.sizes()), " (class dim removed)");
  }
  const int64_t classes = input.dim() == 1 ? input.size(0) : input.size(1);
  check_weight_and_reduction(op, weight, input, classes, reduction);
}

void check_cross_entropy_args(const Tensor& input, const Tensor& target,
                              const OptTensor& weight, double label_smoothing,
                              int64_t reduction) {
  check_class_index_args("cross_entropy", input, target, weight, reduction);
  LINCLASS_CHECK(label_smoothing <= 1.0,
              "cross_entropy: label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
}

void check_cross_entropy_probs_args(const Tensor& input, const Tensor& target,
                                    const OptTensor& weight, double label_smoothing,
                                    int64_t reduction) {
  const char* op = "cross_entropy";
  LINCLASS_CHECK(is_floating(input.scalar_type()), op,
              ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  LINCLASS_CHECK(input.dim() >= 1, op, ": input must have at least 1 dimension");
  LINCLASS_CHECK(target.scalar_type() == input.scalar_type(), op, ": probability target dtype ",
              target.scalar_type(), " does not match input dtype ", input.scalar_type());
  bool same_shape = target.dim() == input.dim();
  for (int64_t d = 0; same_shape && d < input.dim(); ++d) same_shape = target.size(d) == input.size(d);
  LINCLASS_CHECK(same_shape, op, ": probability target shape ", shape_string(target.sizes()),
                 " does not match input shape ", shape_string(input.sizes()));
  LINCLASS_CHECK(same_device(target, input), op, ": target is on ", device_string(target),
              " but input is on ", device_string(input));
  const int64_t classes = input.size(input.dim() == 1 ? 0 : 1);
  check_weight_and_reduction(op, weight, input, classes, reduction);
  LINCLASS_CHECK(label_smoothing <= 1.0,
              "cross_entropy: label_smoothing must be between 0.0 and 1.0. Got: ", label_smoothing);
}

void check_multi_margin_args(const Tensor& input, const Tensor& target, int64_t p,
                             const OptTensor& weight, int64_t reduction) {
  check_class_index_args("multi_margin_loss", input, target, weight, reduction);
  LINCLASS_CHECK(input.dim() == 2 && input.size(1) > 0,
              "multi_margin_loss: expected input of shape (N, C) with C > 0, got ", shape_string(input.sizes()));
  LINCLASS_CHECK(p == 1 || p == 2, "multi_margin_loss: only p == 1 and p == 2 supported, got ", p);
}

std::pair<Tensor, RowGeometry> rows_of(const Tensor& input) {
  if (auto g = row_geometry(input)) return {input, *g};
  Tensor c = as_contiguous(input);
  return {c, *row_geometry(c)};
}

Tensor empty_loss(const Tensor& input, const Tensor& target, int64_t reduction) {
  const ScalarType acc = acc_scalar_type(input.scalar_type());
  if (reduction == kNone) return empty(target.sizes(), acc, input);
  return empty({}, acc, input);
}

}  // namespace linclass
