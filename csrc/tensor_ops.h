// The tensor type and the few tensor operations linclass's host code needs, on the
// LibTorch stable ABI only (torch/csrc/stable, torch/headeronly): the compiled library
// then calls libtorch through its versioned C shim, so one build loads into every torch
// from the oldest one the shim functions below exist in (see pyproject.toml) onwards.
//
// Errors: a C++ exception thrown by a stable-ABI kernel reaches Python as a
// RuntimeError carrying its message.  Where torch raises another type for the same
// mistake, the message starts with a tag ("[IndexError] ") that linclass/_ops.py turns
// back into that type.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>
#include <torch/headeronly/util/BFloat16.h>
#include <torch/headeronly/util/Half.h>

#include <array>
#include <cstdint>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace linclass {

using Tensor = torch::stable::Tensor;
using OptTensor = std::optional<Tensor>;
using ScalarType = torch::headeronly::ScalarType;
using IntList = torch::headeronly::IntHeaderOnlyArrayRef;
using Half = torch::headeronly::Half;
using BFloat16 = torch::headeronly::BFloat16;

// ---- errors -------------------------------------------------------------------------

template <typename... Parts>
std::string str_cat(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  return os.str();
}

// The tags linclass/_ops.py maps to Python exception types (RuntimeError untagged).
constexpr const char* kIndexErrorTag = "[IndexError] ";
constexpr const char* kNotImplementedTag = "[NotImplementedError] ";

#define LINCLASS_CHECK(cond, ...) \
  if (!(cond)) throw std::runtime_error(::linclass::str_cat(__VA_ARGS__))
#define LINCLASS_CHECK_INDEX(cond, ...) \
  if (!(cond)) throw std::runtime_error(::linclass::str_cat(::linclass::kIndexErrorTag, __VA_ARGS__))

// "[2, 3]", as torch prints a shape.
std::string shape_string(IntList shape);
// "cpu", "cuda:0".
std::string device_string(const Tensor& t);

inline bool is_floating(ScalarType t) {
  return t == ScalarType::Float || t == ScalarType::Double || t == ScalarType::Half ||
         t == ScalarType::BFloat16;
}
inline bool same_device(const Tensor& a, const Tensor& b) { return a.device() == b.device(); }

// The accumulation type of a scalar type: float for the 16-bit types (as at::opmath_type).
template <typename T>
using acc_type = std::conditional_t<std::is_same_v<T, Half> || std::is_same_v<T, BFloat16>, float, T>;
inline ScalarType acc_scalar_type(ScalarType t) {
  return t == ScalarType::Half || t == ScalarType::BFloat16 ? ScalarType::Float : t;
}

// Runs the lambda with `scalar_t` defined as the C++ type of `t`: every floating type
// (float, double, Half, BFloat16), or float and double only.
#define LINCLASS_TYPE_CASE(enum_name, cpp_type, ...) \
  case ::linclass::ScalarType::enum_name: {          \
    using scalar_t = cpp_type;                       \
    return __VA_ARGS__();                            \
  }
#define LINCLASS_TYPE_DEFAULT(t, NAME) \
  default:                             \
    throw std::runtime_error(::linclass::str_cat(NAME, ": unsupported dtype ", t));
#define LINCLASS_DISPATCH_FLOAT_DOUBLE(t, NAME, ...)  \
  [&] {                                               \
    switch (t) {                                      \
      LINCLASS_TYPE_CASE(Float, float, __VA_ARGS__)   \
      LINCLASS_TYPE_CASE(Double, double, __VA_ARGS__) \
      LINCLASS_TYPE_DEFAULT(t, NAME)                  \
    }                                                 \
  }()
#define LINCLASS_DISPATCH_FLOATING(t, NAME, ...)                  \
  [&] {                                                           \
    switch (t) {                                                  \
      LINCLASS_TYPE_CASE(Float, float, __VA_ARGS__)               \
      LINCLASS_TYPE_CASE(Double, double, __VA_ARGS__)             \
      LINCLASS_TYPE_CASE(Half, ::linclass::Half, __VA_ARGS__)     \
      LINCLASS_TYPE_CASE(BFloat16, ::linclass::BFloat16, __VA_ARGS__) \
      LINCLASS_TYPE_DEFAULT(t, NAME)                              \
    }                                                             \
  }()

// ---- tensors ------------------------------------------------------------------------

// The row-major strides of a contiguous tensor of `sizes` (as torch sets them: a dim of
// size 0 or 1 counts as 1).
struct ContiguousStrides {
  static constexpr size_t kMaxDims = 16;
  int64_t values[kMaxDims];
  size_t dims;
  explicit ContiguousStrides(IntList sizes) : dims(sizes.size()) {
    LINCLASS_CHECK(dims <= kMaxDims, "linclass: tensors of more than ", kMaxDims,
                   " dims are not supported");
    int64_t step = 1;
    for (int64_t d = int64_t(dims) - 1; d >= 0; --d) {
      values[d] = step;
      step *= sizes[d] > 1 ? sizes[d] : 1;
    }
  }
  IntList list() const { return IntList(values, dims); }
};

// Uninitialized contiguous tensor on `like`'s device (the shim's empty_strided: no
// dispatcher round trip, which costs as much as a tiny loss).
Tensor empty(IntList sizes, ScalarType dtype, const Tensor& like);
inline Tensor empty(IntList sizes, const Tensor& like) { return empty(sizes, like.scalar_type(), like); }
Tensor empty_cpu(IntList sizes, ScalarType dtype);
Tensor empty_cpu_strided(IntList sizes, IntList strides, ScalarType dtype);
// The strides of a tensor laid out like `t` when t's elements are dense and do not
// overlap (any order of its dims), the rule torch's autograd holds a gradient to (its
// layout contract; empty_like's preserve_format): t's strides, with those of size-1
// dims made at least 1.  nullopt otherwise (then the contiguous strides), and for an
// empty t.  linclass/_ops.py's fake kernels follow the same rule.
std::optional<std::vector<int64_t>> dense_strides(const Tensor& t);
// The size-0 tensor the ops return for a gradient that was not asked for.
inline Tensor empty_none(const Tensor& like) { return empty({0}, like); }

size_t element_size(ScalarType t);
inline int64_t nbytes(const Tensor& t) { return t.numel() * int64_t(t.element_size()); }

// aten ops through the dispatcher (torch_call_dispatcher): each argument converted to
// its stable value; returns the op's first output.  torch_call_dispatcher cannot pass a
// Scalar argument (torch 2.14), so ops with one (addmm's beta, add's alpha, mul by a
// number) go through the C shims below instead.
template <typename... Args>
Tensor call_aten(const char* name, const char* overload, const Args&... args) {
  std::array<StableIValue, sizeof...(Args) < 1 ? 1 : sizeof...(Args)> stack{
      torch::stable::detail::from(args)...};
  STABLE_TORCH_ERROR_CODE_CHECK(torch_call_dispatcher(name, overload, stack.data(), TORCH_ABI_VERSION));
  return torch::stable::detail::to<Tensor>(stack[0]);
}

inline Tensor as_contiguous(const Tensor& t) { return t.is_contiguous() ? t : torch::stable::contiguous(t); }
inline Tensor transposed(const Tensor& t) { return torch::stable::transpose(t, 0, 1); }
inline Tensor to_dtype(const Tensor& t, ScalarType dtype) {
  return t.scalar_type() == dtype ? t : torch::stable::to(t, dtype);
}
inline Tensor narrowed(const Tensor& t, int64_t dim, int64_t start, int64_t length) {
  return torch::stable::narrow(const_cast<Tensor&>(t), dim, start, length);
}
// out = a @ b;  out = self + a @ b (out may be self: an in-place addmm).
inline void mm_out(const Tensor& out, const Tensor& a, const Tensor& b) {
  call_aten("aten::mm", "out", a, b, out);
}
inline Tensor mm(const Tensor& a, const Tensor& b) { return call_aten("aten::mm", "", a, b); }
void addmm_out(const Tensor& out, const Tensor& self, const Tensor& a, const Tensor& b);
inline void addmm_(const Tensor& self, const Tensor& a, const Tensor& b) { addmm_out(self, self, a, b); }
// torch's oneDNN inner product (mkldnn::_linear_pointwise, in torch's x86 builds): a new
// x @ w^T (+ bias), or x @ w^T + other (its "binary add" form).
inline Tensor onednn_linear(const Tensor& x, const Tensor& w, const OptTensor& bias) {
  return call_aten("mkldnn::_linear_pointwise", "", x, w, bias, std::string("none"),
                   std::vector<int64_t>{}, std::optional<std::string>());
}
inline Tensor onednn_linear_add(const Tensor& x, const Tensor& other, const Tensor& w) {
  return call_aten("mkldnn::_linear_pointwise", "binary", x, other, w, OptTensor(),
                   std::string("add"));
}
// self *= factor (a number, or a tensor that broadcasts); a + b.
void mul_(const Tensor& self, double factor);
inline void mul_(const Tensor& self, const Tensor& other) { call_aten("aten::mul_", "Tensor", self, other); }
// a + b through the one Scalar-taking op the stable ABI wraps (a - alpha * b, alpha = -1:
// bitwise the same sum).
inline Tensor added(const Tensor& a, const Tensor& b) { return torch::stable::subtract(a, b, -1.0); }
// The sums over dim 0, accumulated and returned in `dtype` (no converted copy of t).
inline Tensor column_sums(const Tensor& t, ScalarType dtype) {
  const int64_t dim0[1] = {0};
  return torch::stable::sum(t, IntList(dim0, 1), false, dtype);
}
inline void copy_into(const Tensor& dst, const Tensor& src) {
  torch::stable::copy_(const_cast<Tensor&>(dst), src);
}
inline void fill_zero(const Tensor& t) { torch::stable::zero_(const_cast<Tensor&>(t)); }
inline Tensor gather_rows(const Tensor& t, int64_t dim, const Tensor& index) {
  return call_aten("aten::index_select", "", t, dim, index);
}
inline void index_select_out(const Tensor& out, const Tensor& t, int64_t dim, const Tensor& index) {
  call_aten("aten::index_select", "out", t, dim, index, out);
}

}  // namespace linclass
