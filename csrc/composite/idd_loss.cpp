// The inter-class distance loss between a student's and a teacher's distance matrices,
// forward and analytic backward. Device-generic: O(B K^2) elementwise work and one reduction,
// so one ATen implementation serves every device (CompositeExplicitAutograd), without a host
// sync, for every floating dtype (half and bfloat16 accumulate in float32).
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace idd_ops {
namespace {

// Pairs (b, i, j), i < j, whose classes are present for the student and for the teacher.
at::Tensor valid_pairs(const at::Tensor& student_counts, const at::Tensor& teacher_counts) {
  const at::Tensor present = (student_counts > 0).logical_and(teacher_counts > 0);
  const at::Tensor upper = at::ones({present.size(1), present.size(1)}, present.options()).triu(1);
  return present.unsqueeze(2).logical_and(present.unsqueeze(1)).logical_and(upper);
}

// Ds - Dt on the valid pairs, 0 elsewhere (even where an unused entry is not finite).
at::Tensor pair_differences(const at::Tensor& ds, const at::Tensor& dt, const at::Tensor& valid) {
  const auto acc = acc_dtype(ds.scalar_type());
  return at::where(valid, ds.to(acc) - dt.to(acc), at::zeros({}, ds.options().dtype(acc)));
}

at::Tensor idd_loss(const at::Tensor& student_dist, const at::Tensor& teacher_dist, const at::Tensor& student_counts,
                    const at::Tensor& teacher_counts, c10::string_view reduction_name) {
  check_idd_loss_inputs(student_dist, teacher_dist, student_counts, teacher_counts);
  const Reduction reduction = parse_reduction(std::string(reduction_name));
  const at::Tensor valid = valid_pairs(student_counts, teacher_counts);
  const at::Tensor sums = pair_differences(student_dist, teacher_dist, valid).square().sum({1, 2});
  const at::Tensor n = valid.sum({1, 2}).to(sums.scalar_type());
  at::Tensor loss;
  switch (reduction) {
    case Reduction::Sum:
      loss = sums.sum();
      break;
    case Reduction::None:  // each image's mean over its own pairs
      loss = sums / n.clamp_min(1);
      break;
    default:  // mean over every valid pair of the batch
      loss = sums.sum() / n.sum().clamp_min(1);
  }
  return loss.to(student_dist.scalar_type());
}

// grad_Ds[b, i, j] = 2 s_b (Ds - Dt) on valid pairs, with s_b = d loss / d (image b's sum).
at::Tensor idd_loss_backward(const at::Tensor& grad, const at::Tensor& student_dist, const at::Tensor& teacher_dist,
                             const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                             c10::string_view reduction_name) {
  const Reduction reduction = parse_reduction(std::string(reduction_name));
  check_idd_loss_backward_inputs(grad, student_dist, teacher_dist, student_counts, teacher_counts, reduction);
  const at::Tensor valid = valid_pairs(student_counts, teacher_counts);
  const at::Tensor diff = pair_differences(student_dist, teacher_dist, valid);
  const at::Tensor g = grad.to(diff.scalar_type());
  const at::Tensor n = valid.sum({1, 2}).to(diff.scalar_type());
  at::Tensor scale;
  switch (reduction) {
    case Reduction::Sum:
      scale = g.reshape({});
      break;
    case Reduction::None:
      scale = (g / n.clamp_min(1)).view({-1, 1, 1});
      break;
    default:
      scale = g.reshape({}) / n.sum().clamp_min(1);
  }
  return (2 * scale * diff).to(student_dist.scalar_type());
}

}  // namespace

// One implementation for every device: it is built from ATen calls.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("idd_loss", &idd_loss);
  m.impl("_idd_loss_backward", &idd_loss_backward);
}

}  // namespace idd_ops
