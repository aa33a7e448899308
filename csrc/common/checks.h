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
  TORCH_CHECK_VALUE(feats.size(2) * feats.size(3) == 0 || labels.size(1) * labels.size(2) > 0,
                    "labels: spatial size ", labels.sizes(), " is empty but feats' is not");
}

// softmax_kl: two [outer, length, inner] tensors of one shape and a positive temperature.
inline void check_kl_inputs(const at::Tensor& s, const at::Tensor& t, double temperature) {
  TORCH_CHECK_VALUE(s.dim() == 3 && s.sizes() == t.sizes(), "student: expected [outer, length, inner] shaped like ",
                    "teacher, got ", s.sizes(), " and ", t.sizes());
  TORCH_CHECK_VALUE(temperature > 0, "temperature: expected > 0, got ", temperature);
  TORCH_CHECK_VALUE(s.device() == t.device(), "teacher: on ", t.device(), " but student on ", s.device());
}

// position_encoding_loss: pred [B, M, H, W] with one (kind, param) per map.
inline void check_position_maps(const at::Tensor& pred, at::IntArrayRef kinds, at::ArrayRef<double> params) {
  TORCH_CHECK_VALUE(pred.dim() == 4, "pred: expected a 4-D [B, M, H, W] tensor, got ", pred.dim(), "-D");
  TORCH_CHECK_VALUE(pred.size(1) == static_cast<int64_t>(kinds.size()) && kinds.size() == params.size(),
                    "pred: ", pred.size(1), " maps but ", kinds.size(), " map kinds");
}

// The accumulation dtype of a feature dtype: float for half/bfloat16/float, double for double.
inline at::ScalarType acc_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

}  // namespace idd_ops
