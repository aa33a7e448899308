// Class slot of every feature pixel (_label_slots) on CUDA: one thread per pixel, the nearest
// resize rule of common/label_index.h through pixel_class. A label outside [0, K) that is not
// ignore_index stops the kernel with a device-side assert, as class_centroids does.
#include <cuda_runtime.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "cuda_utils.cuh"
#include "label_view.cuh"

namespace idd_ops {
namespace {

template <typename label_t>
__global__ void label_slots_kernel_impl(const label_t* __restrict__ labels, LabelView v, int64_t total,
                                        int16_t* __restrict__ slots) {
  const int64_t HW = v.H * v.W;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // (b, p) is one pixel of the output
    slots[e] = static_cast<int16_t>(pixel_class(labels, v, e / HW, e % HW));
  }
}

at::Tensor label_slots_kernel(const at::Tensor& labels_in, int64_t height, int64_t width, int64_t num_classes,
                              int64_t ignore_index) {
  check_label_slots_inputs(labels_in, height, width, num_classes);
  const c10::cuda::CUDAGuard guard(labels_in.device());
  const at::Tensor labels = canonical_labels(labels_in);
  at::Tensor slots = at::empty({labels.size(0), height, width}, labels.options().dtype(at::kShort));
  const int64_t total = slots.numel();
  if (total == 0) return slots;
  const LabelView v = label_view(labels, height, width, num_classes, ignore_index);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  IDD_DISPATCH_LABEL_TYPES(labels.scalar_type(), "label_slots_cuda", [&] {
    label_slots_kernel_impl<scalar_t><<<blocks_for(total), kThreads, 0, stream>>>(
        labels.const_data_ptr<scalar_t>(), v, total, slots.data_ptr<int16_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return slots;
}

}  // namespace

// CUDA implementation of the schema declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) { m.impl("_label_slots", &label_slots_kernel); }

}  // namespace idd_ops
