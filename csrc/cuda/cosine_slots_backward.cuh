#pragma once
// The slot-map cosine's backward on CUDA (cosine_slots_backward_cuda.cu), for its op and for
// IFVD's loss backward (ifvd_maps_cuda.cu), which calls it directly rather than through the
// dispatcher: its gradient map is formed inside the factor pass from the two maps, and its
// centroid table is the one IFVD's forward built.
#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "centroid_norms.cuh"  // CentroidTable

namespace idd_ops {

// IFVD's loss gradient at each pixel: norm * (cos_student - cos_teacher) * g, where g is the
// loss's gradient (the backward's 0-dim `grad`) and norm twice the loss's factor.
struct IfvdLossGrad {
  at::Tensor cos_teacher;  // [B, H, W], the accumulation dtype (the student's map is `cos`)
  double norm;
};

// _pixel_centroid_cosine_slots_backward on inputs its checks passed, given its centroids' table
// (centroid_table, or IFVD's forward's): (grad_feats, grad_centroids in the accumulation dtype).
// With `ifvd`, `grad` is the loss's 0-dim gradient and the map's gradient is IfvdLossGrad's.
std::tuple<at::Tensor, at::Tensor> cosine_slots_backward_cuda(const at::Tensor& grad, const at::Tensor& feats,
                                                              const CentroidTable& table, const at::Tensor& slots,
                                                              const at::Tensor& cos, const at::Tensor& feat_norms,
                                                              double eps, const std::optional<at::Tensor>& counts,
                                                              const IfvdLossGrad* ifvd);

}  // namespace idd_ops
