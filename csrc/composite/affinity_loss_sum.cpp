// SKD reduced in one op (_affinity_loss_sum) and its backward from affinity_loss's own
// formulations, on every device without a kernel of its own (the CPU; CUDA's is in
// csrc/cuda/affinity_loss_cuda.cu): the per-image means added in float64 and scaled once; the
// backward is affinity_loss's with the incoming gradient scaled, the same for every image.
#include <torch/library.h>

#include <tuple>

#include "../common/checks.h"
#include "affinity_loss.h"

namespace idd_ops {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_sum_composite(const at::Tensor& student,
                                                                           const at::Tensor& teacher, int64_t pool,
                                                                           bool mean) {
  check_affinity_loss_inputs(student, teacher, pool);
  auto [means, gss, gsd] = affinity_loss_composite(student, teacher, pool);
  const int64_t P = affinity_pooled_pixels(student.size(2), student.size(3), pool);
  return {affinity_loss_total(means, affinity_sum_scale(student.size(0), P, mean)), gss, gsd};
}

at::Tensor affinity_loss_sum_backward_composite(const at::Tensor& grad, const at::Tensor& student,
                                                const at::Tensor& teacher, const at::Tensor& gss,
                                                const at::Tensor& gsd, int64_t pool, bool mean) {
  check_affinity_loss_backward_inputs(grad, student, teacher, gss, gsd, pool, /*reduced=*/true);
  const int64_t B = student.size(0), P = affinity_pooled_pixels(student.size(2), student.size(3), pool);
  const at::Tensor g = affinity_sum_grad(grad, affinity_sum_scale(B, P, mean), B, gss.scalar_type());
  return affinity_loss_backward_composite(g, student, teacher, gss, gsd, pool);
}

}  // namespace

// One ATen formulation for every device that has no kernel of its own.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("_affinity_loss_sum", &affinity_loss_sum_composite);
  m.impl("_affinity_loss_sum_backward", &affinity_loss_sum_backward_composite);
}

}  // namespace idd_ops
