// Pairwise distances between per-image class centroids, forward and analytic backward.
// Device-generic: the work is O(B K^2 C), small next to the feature passes, and maps onto a
// few batched ATen calls (one Gram GEMM each way), so one implementation serves
// every device (CompositeExplicitAutograd). The CPU tests thereby test the code a GPU runs, and
// a large K spreads over the whole GPU instead of one block per image.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"
#include "centroid_gradient.h"
#include "valid_entries.h"

namespace idd_ops {
namespace {

// |c_i| |c_j| floored at eps: the cosine denominator [B, K, K].
at::Tensor cosine_denominator(const at::Tensor& norm_sq, double eps) {
  return (norm_sq.unsqueeze(2) * norm_sq.unsqueeze(1)).sqrt().clamp_min(eps);
}

// Centroids minus the mean of each image's present ones. Euclidean distances do not change,
// but |c_i|^2 + |c_j|^2 - 2 <c_i, c_j> then cancels far less: its rounding error scales with
// the spread of the centroids, not with their distance from the origin (ReLU features share a
// large common mean).
at::Tensor centred(const at::Tensor& c, const at::Tensor& counts) {
  // the mean as a [B, 1, K] x [B, K, C] product: no [B, K, C] temporary besides the result
  const at::Tensor present = (counts > 0).to(c.scalar_type()).unsqueeze(1);
  return c - at::bmm(present, c) / present.sum(2, /*keepdim=*/true).clamp_min(1);
}

// Raw distances R [B, K, K] (0 off the valid entries) of float64 centroids c, centred first for
// the euclidean metrics. Through one GEMM, as torch.cdist does for large inputs: a direct
// difference per pair costs O(K^2 C) scalar work without a GEMM's speed. Being float64, the
// GEMMs never run in TF32, whatever torch.backends.cuda.matmul.allow_tf32 says.
at::Tensor raw_distances(const at::Tensor& c, const at::Tensor& valid, Metric metric, double eps) {
  const at::Tensor gram = at::bmm(c, c.transpose(1, 2));
  // |c_i|^2 from the Gram itself: no pass over c, and R_ii = 0 exactly
  const at::Tensor norm_sq = gram.diagonal(0, 1, 2);
  at::Tensor d;
  if (metric == Metric::Cosine) {
    d = 1 - gram / cosine_denominator(norm_sq, eps);
  } else {
    d = (norm_sq.unsqueeze(2) + norm_sq.unsqueeze(1) - 2 * gram).clamp_min(0);
    if (metric == Metric::Euclidean) d = d.sqrt();
  }
  return at::where(valid, d, at::zeros({}, d.options()));
}

// The centroids that raw_distances expects for `metric`, in float64 whatever their dtype. In
// float32, |c_i|^2 + |c_j|^2 - 2 <c_i, c_j> (and 1 - cos) keeps an absolute error of some 1e-7 of
// the centroids' spread squared (more with many channels): nothing of the distance of two classes
// 1e-4 of the spread apart, a nearly merged pair, the very case the loss exists for; the
// backward's sum_j a_ij (c_i - c_j) cancels as much. The GEMMs are O(B K^2 C), small next to the
// feature passes at the usual K (METHOD.md 8).
at::Tensor prepared(const at::Tensor& centroids, const at::Tensor& counts, Metric metric) {
  const at::Tensor c = centroids.to(at::kDouble);
  return metric == Metric::Cosine ? c : centred(c, counts);
}

// normalize="mean": per-image divisor m = max(mean of the n valid entries, eps), 1 where
// n == 0, as [B, 1, 1]; `clamped` marks images whose m does not follow the entries.
struct MeanNormalizer {
  at::Tensor m, n, clamped;
};

MeanNormalizer mean_normalizer(const at::Tensor& raw, const at::Tensor& valid, double eps) {
  const at::Tensor n = valid.sum({1, 2}, /*keepdim=*/true).to(raw.scalar_type());
  const at::Tensor mean = raw.sum({1, 2}, /*keepdim=*/true) / n.clamp_min(1);
  const at::Tensor clamped = (n == 0).logical_or(mean.le(eps));
  return {at::where(n > 0, mean.clamp_min(eps), at::ones_like(mean)), n, clamped};
}

at::Tensor class_distance_matrix(const at::Tensor& centroids, const at::Tensor& counts, c10::string_view metric_name,
                                 bool normalize, double eps) {
  check_class_distance_matrix_inputs(centroids, counts, eps);
  const Metric metric = parse_metric(std::string(metric_name));
  const at::Tensor valid = valid_entries(counts);
  at::Tensor d = raw_distances(prepared(centroids, counts, metric), valid, metric, eps);
  if (normalize) d = d / mean_normalizer(d, valid, eps).m;
  return d.to(centroids.scalar_type());
}

// grad_c_i = sum_j W_ij (a_ij c_i + b_ij c_j), with W_ij = G_ij + G_ji the gradient reaching
// the pair through both of its entries (G w.r.t. the raw entries) and {a, b} the metric's
// derivative d R_ij / d c_i = a_ij c_i + b_ij c_j.
at::Tensor class_distance_matrix_backward(const at::Tensor& grad, const at::Tensor& centroids, const at::Tensor& counts,
                                          c10::string_view metric_name, bool normalize, double eps) {
  check_class_distance_matrix_backward_inputs(grad, centroids, counts, eps);
  const Metric metric = parse_metric(std::string(metric_name));
  const at::Tensor c = prepared(centroids, counts, metric);  // sum_j a_ij (c_i - c_j) is shift-free
  const at::Tensor valid = valid_entries(counts);
  const at::Tensor raw = raw_distances(c, valid, metric, eps);
  const at::Tensor zero = at::zeros({}, raw.options());
  at::Tensor g = grad.to(raw.scalar_type());
  if (normalize) {
    // D = R / m with m the mean of the valid R: dm/dR = 1/n, unless m is clamped (constant).
    const MeanNormalizer nz = mean_normalizer(raw, valid, eps);
    const at::Tensor gD = (g * raw).sum({1, 2}, /*keepdim=*/true) / nz.m;
    g = at::where(nz.clamped, g / nz.m, g / nz.m - gD / (nz.m * nz.n.clamp_min(1)));
  }
  const at::Tensor w = at::where(valid, g + g.transpose(1, 2), zero);
  const at::Tensor norm_sq = metric == Metric::Cosine ? c.square().sum(-1) : at::Tensor();
  const at::Tensor grad_c = centroid_gradient(w, raw, norm_sq, c, metric, eps);
  return grad_c.to(centroids.scalar_type());
}

}  // namespace

// One implementation for every device: it is built from ATen calls.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("class_distance_matrix", &class_distance_matrix);
  m.impl("_class_distance_matrix_backward", &class_distance_matrix_backward);
}

}  // namespace idd_ops
