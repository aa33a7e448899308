// Class means from class sums (_class_means) and their backward from ATen calls, on every device
// without a kernel of its own (the CPU; CUDA's are csrc/cuda/class_means_cuda.cu): the division in
// float64 by the clamped counts, then one cast, as the class-sum path computed them in Python.
#include <torch/library.h>

#include "../common/class_means.h"

namespace idd_ops {
namespace {

at::Tensor class_means_composite(const at::Tensor& sums, const at::Tensor& counts, at::ScalarType dtype) {
  check_class_means_inputs(sums, counts, dtype);
  return at::div(sums, counts.clamp_min(1).unsqueeze(-1)).to(dtype);
}

at::Tensor class_means_backward_composite(const at::Tensor& grad, const at::Tensor& counts) {
  check_class_means_backward_inputs(grad, counts);
  return at::div(grad.to(at::kDouble), counts.clamp_min(1).unsqueeze(-1));
}

}  // namespace

// One ATen formulation for every device that has no kernel of its own.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("_class_means", &class_means_composite);
  m.impl("_class_means_backward", &class_means_backward_composite);
}

}  // namespace idd_ops
