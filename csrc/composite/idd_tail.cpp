// The IDD tail from class sums and counts to the loss, forward and analytic backward, in ATen
// calls: the math reference of the fused CUDA kernel (csrc/cuda/idd_tail_cuda.cu), what the CPU
// runs, and the CUDA path while that kernel is switched off. Layout of the saved tensors and the
// centroid shift: csrc/common/idd_tail.h. No host sync, every floating dtype (half and bfloat16
// sums accumulate in float32).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/idd_tail.h"
#include "centroid_gradient.h"
#include "valid_entries.h"

namespace idd_ops {
namespace {

// 1 / count where count > 0, else 0: [B, K, 1] in `dtype`.
at::Tensor inverse_counts(const at::Tensor& counts, at::ScalarType dtype) {
  const at::Tensor n = counts.to(dtype).unsqueeze(-1);
  return at::where(n > 0, n.reciprocal(), at::zeros({}, n.options()));
}

// Centroids [B, K, C] in `dtype`, shifted by each image's first present centroid for the
// euclidean metrics (see idd_tail.h). Formed and shifted in the sums' precision where that is
// wider (float64 sums of float32 features), so a common offset cancels before the rounding.
at::Tensor centroids_for(const at::Tensor& sums, const at::Tensor& counts, Metric metric, at::ScalarType dtype) {
  const auto wide = at::promote_types(acc_dtype(sums.scalar_type()), dtype);
  at::Tensor c = sums.to(wide) * inverse_counts(counts, wide);
  if (metric != Metric::Cosine && c.size(1) > 0) {  // no classes: nothing to shift (argmax needs one)
    // argmax returns the first maximal index: the first present class (0 when none is, whose
    // centroid is 0)
    const at::Tensor anchor = counts.gt(0).to(at::kInt).argmax(1).view({-1, 1, 1}).expand({-1, 1, c.size(2)});
    c = c - c.gather(1, anchor);
  }
  return c.to(dtype);
}

// Raw distances of centroids c on the valid entries, |c_i|^2 on the diagonal, 0 elsewhere.
at::Tensor raw_with_norms(const at::Tensor& c, const at::Tensor& valid, Metric metric, double eps) {
  const at::Tensor gram = at::bmm(c, c.transpose(1, 2));
  const at::Tensor norm_sq = gram.diagonal(0, 1, 2);  // R_ii = 0 exactly, as the kernel's norms
  at::Tensor d;
  if (metric == Metric::Cosine) {
    d = 1 - gram / (norm_sq.unsqueeze(2) * norm_sq.unsqueeze(1)).sqrt().clamp_min(eps);
  } else {
    d = (norm_sq.unsqueeze(2) + norm_sq.unsqueeze(1) - 2 * gram).clamp_min(0);
    if (metric == Metric::Euclidean) d = d.sqrt();
  }
  return at::where(valid, d, at::diag_embed(norm_sq));
}

// normalize="mean": max(mean of the valid entries, eps), 1 where there is none: [B].
struct Divisor {
  at::Tensor m, entries, clamped;  // entries: valid (i < j) count
};

Divisor divisor(const at::Tensor& raw, const at::Tensor& valid, bool normalize, double eps) {
  const at::Tensor entries = valid.sum({1, 2}).to(raw.scalar_type()) / 2;
  if (!normalize) return {at::ones_like(entries), entries, at::ones_like(entries, entries.options().dtype(at::kBool))};
  const at::Tensor mean = at::where(valid, raw, at::zeros({}, raw.options())).sum({1, 2}) / (2 * entries).clamp_min(1);
  return {at::where(entries > 0, mean.clamp_min(eps), at::ones_like(mean)), entries,
          entries.eq(0).logical_or(mean.le(eps))};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> idd_tail_composite(const at::Tensor& student_sums,
                                                                  const at::Tensor& student_counts,
                                                                  const at::Tensor& teacher_sums,
                                                                  const at::Tensor& teacher_counts,
                                                                  c10::string_view metric_name, bool normalize,
                                                                  double eps, c10::string_view reduction_name,
                                                                  std::optional<at::ScalarType> dtype,
                                                                  std::optional<at::ScalarType> loss_dtype) {
  check_idd_tail_inputs(student_sums, student_counts, teacher_sums, teacher_counts, eps);
  const Metric metric = metric_code(metric_name);
  const Reduction reduction = reduction_code(reduction_name);
  const auto acc = tail_dtype(student_sums, dtype);
  const auto out_dtype = tail_loss_dtype(acc, loss_dtype);
  const int64_t B = student_sums.size(0), K = student_sums.size(1);
  const at::Tensor valid_s = valid_entries(student_counts), valid_t = valid_entries(teacher_counts);
  const at::Tensor rs = raw_with_norms(centroids_for(student_sums, student_counts, metric, acc), valid_s, metric, eps);
  const at::Tensor rt = raw_with_norms(centroids_for(teacher_sums, teacher_counts, metric, acc), valid_t, metric, eps);
  const Divisor ds = divisor(rs, valid_s, normalize, eps), dt = divisor(rt, valid_t, normalize, eps);
  // pairs i < j valid for both networks; E = Rs / ms - Rt / mt there
  const at::Tensor pairs = valid_s.logical_and(valid_t).triu(1);
  const at::Tensor e = at::where(pairs, rs / ds.m.view({-1, 1, 1}) - rt / dt.m.view({-1, 1, 1}),
                                 at::zeros({}, rs.options()));
  const at::Tensor loss_sum = e.square().sum({1, 2});
  const at::Tensor n_pairs = pairs.sum({1, 2}).to(acc);
  at::Tensor loss, scale;
  switch (reduction) {
    case Reduction::Sum:
      loss = loss_sum.sum();
      scale = at::ones_like(loss_sum);
      break;
    case Reduction::None:  // each image's mean over its own pairs
      loss = loss_sum / n_pairs.clamp_min(1);
      scale = n_pairs.clamp_min(1).reciprocal();
      break;
    default: {  // mean over every valid pair of the batch
      const at::Tensor total = n_pairs.sum().clamp_min(1);
      loss = loss_sum.sum() / total;
      scale = total.reciprocal().expand({B});
    }
  }
  const at::Tensor q = (e * rs).sum({1, 2});
  const at::Tensor kappa = normalize ? at::where(ds.clamped, at::zeros({}, q.options()), q / (ds.m * ds.entries.clamp_min(1)))
                                     : at::zeros_like(q);
  at::Tensor stats = at::zeros({B, K + 1, kNumStats}, rs.options().dtype(at::kDouble));
  stats.select(1, K).copy_(at::stack({ds.m, dt.m, scale, kappa, loss_sum, n_pairs, q, ds.entries}, 1));
  return {loss.to(out_dtype), at::stack({rs, rt}, 1), stats};
}

// grad_c_i = sum_j a_ij c_i + b_ij c_j with W_ij = 2 s_b / m_s (E_ij - kappa_b) on the valid
// student entries (E = 0 off the valid pairs): the gradient reaching the pair through both of
// its entries, the mean normaliser's share included, and {a, b} the metric's derivative
// d R_ij / d c_i = a_ij c_i + b_ij c_j. Then grad_sum_i = grad_c_i / count_i.
at::Tensor idd_tail_backward_composite(const at::Tensor& grad, const at::Tensor& student_sums,
                                       const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                                       const at::Tensor& dist, const at::Tensor& stats, c10::string_view metric_name,
                                       bool normalize, double eps, c10::string_view reduction_name) {
  const Reduction reduction = reduction_code(reduction_name);
  check_idd_tail_backward_inputs(grad, student_sums, student_counts, teacher_counts, dist, stats, eps, reduction);
  const Metric metric = metric_code(metric_name);
  const auto acc = dist.scalar_type();
  const int64_t K = student_sums.size(1);
  const at::Tensor per_image = stats.select(1, K).to(acc);  // [B, 8]
  const at::Tensor ms = per_image.select(1, kStatStudentDivisor).view({-1, 1, 1});
  const at::Tensor mt = per_image.select(1, kStatTeacherDivisor).view({-1, 1, 1});
  const at::Tensor g = (reduction == Reduction::None ? grad.reshape({-1}) : grad.reshape({1})).to(acc);
  const at::Tensor alpha = (2 * g * per_image.select(1, kStatPairScale)).view({-1, 1, 1}) / ms;
  const at::Tensor kappa = per_image.select(1, kStatKappa).view({-1, 1, 1});
  const at::Tensor valid_s = valid_entries(student_counts);
  const at::Tensor pairs = valid_s.logical_and(valid_entries(teacher_counts));
  const at::Tensor rs = dist.select(1, 0), rt = dist.select(1, 1), zero = at::zeros({}, rs.options());
  const at::Tensor e = at::where(pairs, rs / ms - rt / mt, zero);
  const at::Tensor w = at::where(valid_s, alpha * (e - kappa), zero);
  const at::Tensor c = centroids_for(student_sums, student_counts, metric, acc);
  // rs is 0 off the valid entries but for its diagonal of norms, where w is 0
  const at::Tensor grad_c = centroid_gradient(w, rs, rs.diagonal(0, 1, 2), c, metric, eps);
  return (grad_c * inverse_counts(student_counts, acc)).to(student_sums.scalar_type());
}

TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("idd_tail", &idd_tail_composite);
  m.impl("_idd_tail_backward", &idd_tail_backward_composite);
}

}  // namespace idd_ops
