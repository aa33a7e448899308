#pragma once
// Reading labels [B, Hy, Wy] at feature resolution inside CUDA kernels (nearest resize on the fly).
#include <ATen/ATen.h>

#include "../common/label_index.h"

namespace idd_ops {

struct LabelView {
  int64_t H, W, Hy, Wy, s0, s1, s2, num_classes, ignore_index;
};

// Class slot (or -1) of feature pixel p of image b.
template <typename label_t>
__device__ __forceinline__ int64_t pixel_class(const label_t* labels, const LabelView& v, int64_t b, int64_t p) {
  const int64_t row = p / v.W, col = p % v.W;
  const int64_t raw = static_cast<int64_t>(
      labels[b * v.s0 + nearest_source_index(row, v.Hy, v.H) * v.s1 + nearest_source_index(col, v.Wy, v.W) * v.s2]);
  const int64_t k = class_slot(raw, v.num_classes, v.ignore_index);
  // As nll_loss does: a label outside [0, K) that is not ignore_index stops the kernel with a
  // device-side assert (checking on the host would need a sync).
  CUDA_KERNEL_ASSERT((k >= 0 || raw == v.ignore_index) && "labels: a value is outside [0, num_classes) and not ignore_index");
  return k;
}

inline LabelView label_view(const at::Tensor& labels, int64_t H, int64_t W, int64_t K, int64_t ignore_index) {
  return {H, W, labels.size(1), labels.size(2), labels.stride(0), labels.stride(1), labels.stride(2), K, ignore_index};
}

}  // namespace idd_ops
