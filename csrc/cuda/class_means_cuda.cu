// Class means from class sums (_class_means) and their backward on CUDA: one elementwise launch
// each, where the ATen route took a clamp, a division and a cast forward and a cast and a division
// backward. The same arithmetic as that route (a float64 division by max(count, 1), rounded once to
// the output dtype), so the same bits.
#include <torch/library.h>

#include "../common/class_means.h"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

// Elements i of [B*K, C] rows: row i / C's count divides it.
template <typename in_t, typename out_t>
__global__ void divide_by_counts_kernel(const in_t* __restrict__ in, const int64_t* __restrict__ counts, int64_t C,
                                        int64_t n, out_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t count = counts[i / C];
    out[i] = static_cast<out_t>(static_cast<double>(in[i]) / static_cast<double>(count > 1 ? count : 1));
  }
}

template <typename in_t, typename out_t>
void divide_by_counts(const at::Tensor& in, const at::Tensor& counts, at::Tensor& out) {
  const int64_t n = in.numel();
  if (n == 0) return;
  divide_by_counts_kernel<in_t, out_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      in.const_data_ptr<in_t>(), counts.const_data_ptr<int64_t>(), in.size(2), n, out.data_ptr<out_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor class_means_kernel(const at::Tensor& sums_in, const at::Tensor& counts_in, at::ScalarType dtype) {
  check_class_means_inputs(sums_in, counts_in, dtype);
  const c10::cuda::CUDAGuard guard(sums_in.device());
  const at::Tensor sums = sums_in.contiguous(), counts = counts_in.contiguous();
  at::Tensor out = at::empty(sums.sizes(), sums.options().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_means_cuda",
                                  [&] { divide_by_counts<double, scalar_t>(sums, counts, out); });
  return out;
}

at::Tensor class_means_backward_kernel(const at::Tensor& grad_in, const at::Tensor& counts_in) {
  check_class_means_backward_inputs(grad_in, counts_in);
  const c10::cuda::CUDAGuard guard(grad_in.device());
  const at::Tensor grad = grad_in.contiguous(), counts = counts_in.contiguous();
  at::Tensor out = at::empty(grad.sizes(), grad.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "class_means_backward_cuda",
                                  [&] { divide_by_counts<scalar_t, double>(grad, counts, out); });
  return out;
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp (other devices:
// csrc/composite/class_means.cpp).
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("_class_means", &class_means_kernel);
  m.impl("_class_means_backward", &class_means_backward_kernel);
}

}  // namespace idd_ops
