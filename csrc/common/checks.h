#pragma once
// Argument checks shared by every device's kernels. The Python layer validates first with
// friendlier messages; these keep a direct call of the op from reaching a kernel with a
// shape it would misread.
#include <ATen/ATen.h>

namespace idd_ops {

inline void check_feats_labels(const at::Tensor& feats, const at::Tensor& labels, int64_t num_classes) {
  TORCH_CHECK_VALUE(feats.dim() == 4, "feats: expected a 4-D [B, C, H, W] tensor, got ", feats.dim(), "-D");
  TORCH_CHECK_VALUE(labels.dim() == 3, "labels: expected a 3-D [B, Hy, Wy] tensor, got ", labels.dim(), "-D");
  TORCH_CHECK_TYPE(at::isFloatingType(feats.scalar_type()), "feats: expected a floating dtype, got ",
                   feats.scalar_type());
  TORCH_CHECK_TYPE(at::isIntegralType(labels.scalar_type(), /*includeBool=*/false),
                   "labels: expected an integer dtype, got ", labels.scalar_type());
  TORCH_CHECK_VALUE(feats.size(0) == labels.size(0), "labels: batch size ", labels.size(0),
                    " differs from feats' batch size ", feats.size(0));
  TORCH_CHECK_VALUE(num_classes >= 1, "num_classes: expected >= 1, got ", num_classes);
  TORCH_CHECK_VALUE(feats.device() == labels.device(), "labels: on ", labels.device(),
                    " but feats on ", feats.device());
}

// The accumulation dtype of a feature dtype: float for half/bfloat16/float, double for double.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace idd_ops
