#include "tensor_ops.h"

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
Tensor empty_on(IntList sizes, ScalarType dtype, torch::headeronly::DeviceType device_type,
                int32_t device_index) {
  const ContiguousStrides strides(sizes);
  const auto shim_dtype = torch::stable::detail::to<int32_t>(torch::stable::detail::from(dtype));
  const auto shim_device = torch::stable::detail::to<int32_t>(torch::stable::detail::from(device_type));
  AtenTensorHandle handle;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_empty_strided(int64_t(sizes.size()), sizes.data(),
                                                         strides.values, shim_dtype, shim_device,
                                                         device_index, &handle));
  return Tensor(handle);
}
}  // namespace

Tensor empty(IntList sizes, ScalarType dtype, const Tensor& like) {
  return like.is_cpu() ? empty_on(sizes, dtype, torch::headeronly::DeviceType::CPU, 0)
                       : empty_on(sizes, dtype, like.device().type(), like.get_device_index());
}

Tensor empty_cpu(IntList sizes, ScalarType dtype) {
  return empty_on(sizes, dtype, torch::headeronly::DeviceType::CPU, 0);
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
