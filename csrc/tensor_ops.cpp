#include "tensor_ops.h"

#include <algorithm>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cpu.h>
#ifdef LINCLASS_WITH_CUDA
#include <torch/csrc/inductor/aoti_torch/generated/c_shim_cuda.h>
#endif

namespace linclass {

std::string shape_string(IntList shape) {
  std::ostringstream os;
  os << "[";
  for (size_t d = 0; d < shape.size(); ++d) os << (d ? ", " : "") << shape[d];
  os << "]";
  return os.str();
}

std::string device_string(const Tensor& t) {
  if (t.is_cpu()) return "cpu";
  return str_cat(t.is_cuda() ? "cuda:" : "device:", int(t.get_device_index()));
}

namespace {
Tensor empty_on(IntList sizes, const int64_t* strides, ScalarType dtype,
                torch::headeronly::DeviceType device_type, int32_t device_index) {
  const auto shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  const auto shim_device = torch::stable::detail::to<int32_t>(torch::stable::detail::from(device_type));
  AtenTensorHandle handle;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(int64_t(sizes.size()), sizes.data(),
                                                         strides, shim_dtype, shim_device,
                                                         device_index, &handle));
  return Tensor(handle);
}
}  // namespace

Tensor empty(IntList sizes, ScalarType dtype, const Tensor& like) {
  const ContiguousStrides strides(sizes);
  return like.is_cpu() ? empty_on(sizes, strides.values, dtype, torch::headeronly::DeviceType::CPU, 0)
                       : empty_on(sizes, strides.values, dtype, like.device().type(),
                                  like.get_device_index());
}

Tensor empty_cpu(IntList sizes, ScalarType dtype) {
  return empty_cpu_strided(sizes, ContiguousStrides(sizes).list(), dtype);
}

Tensor empty_cpu_strided(IntList sizes, IntList strides, ScalarType dtype) {
  return empty_on(sizes, strides.data(), dtype, torch::headeronly::DeviceType::CPU, 0);
}

std::optional<std::vector<int64_t>> dense_strides(const Tensor& t) {
  const int64_t dims = t.dim();
  if (t.numel() == 0) return std::nullopt;
  std::vector<int64_t> order;  // the dims of more than one element, innermost first
  for (int64_t d = 0; d < dims; ++d)
    if (t.size(d) > 1) order.push_back(d);
  // Stable: equal strides (which only overlapping dims have) keep the dims' order.
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) {
    return t.stride(a) < t.stride(b);
  });
  int64_t expected = 1;
  for (const int64_t d : order) {
    if (t.stride(d) != expected) return std::nullopt;
    expected *= t.size(d);
  }
  std::vector<int64_t> strides(size_t(dims), 0);
  for (int64_t d = 0; d < dims; ++d)
    strides[d] = t.size(d) > 1 ? t.stride(d) : std::max<int64_t>(t.stride(d), 1);
  return strides;
}

void addmm_out(const Tensor& out, const Tensor& self, const Tensor& a, const Tensor& b) {
#ifdef LINCLASS_WITH_CUDA
  if (out.is_cuda()) {
    STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cuda_addmm_out(out.get(), self.get(), a.get(), b.get(), 1.0, 1.0));
    return;
  }
#endif
  LINCLASS_CHECK(out.is_cpu(), "linclass: addmm on ", device_string(out), " is not supported");
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_cpu_addmm_out(out.get(), self.get(), a.get(), b.get(), 1.0, 1.0));
}

void mul_(const Tensor& self, double factor) {
  // A 0-dim CPU double tensor multiplies like a Python number: computed in self's
  // accumulation type, on any device.
  mul_(self, torch::stable::full({}, factor, ScalarType::Double, std::nullopt,
                                 torch::stable::Device(torch::headeronly::DeviceType::CPU)));
}

size_t element_size(ScalarType t) {
  switch (t) {
    case ScalarType::Double:
    case ScalarType::Long:
      return 8;
    case ScalarType::Float:
    case ScalarType::Int:
      return 4;
    case ScalarType::Half:
    case ScalarType::BFloat16:
    case ScalarType::Short:
      return 2;
    default:
      return 1;
  }
}

}  // namespace linclass
