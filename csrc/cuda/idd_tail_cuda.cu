// The IDD tail on CUDA, fused: class sums and counts of both networks -> loss in a few launches
// (idd_tail_forward_cuda.cu says how many), backward in one (idd_tail_backward_cuda.cu). For
// inputs it does not take, the composite (composite/idd_tail.cpp) runs: half or bfloat16 sums,
// student and teacher sums of different dtypes, float32 sums computing in float64, B = 0, K = 0 or
// K > kMaxFusedClasses. The math, the centroid shift and the saved tensors: common/idd_tail.h.
#include <torch/library.h>

#include "idd_tail.cuh"

namespace idd_ops {
namespace {

// Whether the fused kernels take these student sums, with teacher sums of `teacher_type`,
// computing in `acc` (idd_tail.cuh: fused_types); shapes as checked by check_idd_tail_inputs.
bool fused_takes(const at::Tensor& student_sums, at::ScalarType teacher_type, at::ScalarType acc) {
  const auto t = student_sums.scalar_type();
  return fused_types(t, acc) && teacher_type == t && student_sums.size(0) > 0 && student_sums.size(1) > 0 &&
         student_sums.size(1) <= kMaxFusedClasses;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> idd_tail_cuda(const at::Tensor& student_sums,
                                                             const at::Tensor& student_counts,
                                                             const at::Tensor& teacher_sums,
                                                             const at::Tensor& teacher_counts, c10::string_view metric_name,
                                                             bool normalize, double eps,
                                                             c10::string_view reduction_name,
                                                             std::optional<at::ScalarType> dtype,
                                                             std::optional<at::ScalarType> loss_dtype) {
  const auto composite = [&] {
    return idd_tail_composite(student_sums, student_counts, teacher_sums, teacher_counts, metric_name, normalize, eps,
                              reduction_name, dtype, loss_dtype);
  };
  check_idd_tail_inputs(student_sums, student_counts, teacher_sums, teacher_counts, eps);
  const Metric metric = metric_code(metric_name);
  const Reduction reduction = reduction_code(reduction_name);
  const auto acc = tail_dtype(student_sums, dtype);
  if (!fused_takes(student_sums, teacher_sums.scalar_type(), acc)) return composite();
  const c10::cuda::CUDAGuard guard(student_sums.device());
  const int64_t B = student_sums.size(0), K = student_sums.size(1);
  const auto opts = student_sums.options().dtype(acc);
  const auto loss_opts = opts.dtype(tail_loss_dtype(acc, loss_dtype));
  at::Tensor loss = reduction == Reduction::None ? at::empty({B}, loss_opts) : at::empty({}, loss_opts);
  at::Tensor dist = at::empty({B, 2, K, K}, opts);
  at::Tensor stats = at::empty({B, K + 1, kNumStats}, opts.dtype(at::kDouble));
  idd_tail_fused_forward(student_sums, student_counts, teacher_sums, teacher_counts, metric, normalize, eps, reduction,
                         loss, dist, stats);
  return {loss, dist, stats};
}

at::Tensor idd_tail_backward_cuda(const at::Tensor& grad, const at::Tensor& student_sums,
                                  const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                                  const at::Tensor& dist, const at::Tensor& stats, c10::string_view metric_name,
                                  bool normalize, double eps, c10::string_view reduction_name) {
  const auto composite = [&] {
    return idd_tail_backward_composite(grad, student_sums, student_counts, teacher_counts, dist, stats, metric_name,
                                       normalize, eps, reduction_name);
  };
  const Reduction reduction = reduction_code(reduction_name);
  check_idd_tail_backward_inputs(grad, student_sums, student_counts, teacher_counts, dist, stats, eps, reduction);
  const Metric metric = metric_code(metric_name);
  // the compute dtype is dist's (idd_tail's `dtype`)
  const auto acc = dist.scalar_type();
  if (!fused_takes(student_sums, student_sums.scalar_type(), acc)) return composite();
  const c10::cuda::CUDAGuard guard(student_sums.device());
  // the loss's gradient arrives in the loss's dtype, float32 or float64, which the kernel reads
  // as it comes (a cast would be a launch); a caller's other dtype is cast
  const bool readable = grad.scalar_type() == at::kFloat || grad.scalar_type() == at::kDouble;
  const at::Tensor g = readable ? grad : grad.to(acc);
  at::Tensor out = at::empty(student_sums.sizes(), student_sums.options());
  idd_tail_fused_backward(g, student_sums, student_counts, teacher_counts, dist, stats, metric, eps, reduction, out);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("idd_tail", &idd_tail_cuda);
  m.impl("_idd_tail_backward", &idd_tail_backward_cuda);
}

}  // namespace idd_ops
