// The CUDA side of the host code on the LibTorch stable ABI (tensor_ops.h holds the
// rest): the current stream, a device guard and the kernel launch check, all through
// the versioned C shim, so that nothing here binds to libtorch's C++ CUDA classes.
#pragma once

#include <cuda_runtime.h>

#include <torch/csrc/inductor/aoti_torch/c/shim.h>
#include <torch/csrc/stable/accelerator.h>

#include "../tensor_ops.h"

// The shim declares its CUDA functions only under USE_CUDA, which
// torch.utils.cpp_extension does not define; the function itself (AOTInductor's, older
// than the stable ABI) is in libtorch_cuda, which every CUDAExtension links.
#ifndef USE_CUDA
extern "C" AOTITorchError aoti_torch_get_current_cuda_stream(int32_t device_index, void** ret_stream);
#endif

namespace linclass::cuda {

// Makes the tensor's device current for the scope (as the unstable API's CUDAGuard):
// kernels launch, and the caching allocator allocates, on that device.
using DeviceGuard = torch::stable::accelerator::DeviceGuard;

// torch's current stream on the tensor's device, so that the kernels order with the
// caller's other work (and its torch.cuda.stream contexts).
inline cudaStream_t current_stream(const Tensor& t) {
  void* stream = nullptr;
  STABLE_TORCH_ERROR_CODE_CHECK(aoti_torch_get_current_cuda_stream(t.get_device_index(), &stream));
  return static_cast<cudaStream_t>(stream);
}

// After a launch: a bad configuration fails here, at the launch that caused it; errors
// of the kernel itself surface at a later CUDA call.
inline void check_launch() {
  const cudaError_t err = cudaGetLastError();
  LINCLASS_CHECK(err == cudaSuccess, "CUDA error: ", cudaGetErrorString(err),
                 " (kernel errors may be reported at a later call; CUDA_LAUNCH_BLOCKING=1 "
                 "reports them at their launch)");
}

}  // namespace linclass::cuda
