// The inter-class distance loss between a student's and a teacher's distance matrices, on CUDA.
#include <torch/library.h>

#include "../common/idd_loss.h"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

// One block per image: sum of (Ds - Dt)^2 over valid pairs and their number.
template <typename scalar_t>
__global__ void idd_pair_sums_kernel(const scalar_t* __restrict__ ds, const scalar_t* __restrict__ dt,
                                     const int64_t* __restrict__ cs, const int64_t* __restrict__ ct, int64_t K,
                                     scalar_t* __restrict__ sums, int64_t* __restrict__ n_valid) {
  __shared__ scalar_t scratch[kThreads];
  const int64_t b = blockIdx.x;
  scalar_t acc = 0, n = 0;
  for (int64_t e = threadIdx.x; e < K * K; e += blockDim.x)
    if (idd_pair_valid(cs + b * K, ct + b * K, e / K, e % K)) {
      const scalar_t d = ds[b * K * K + e] - dt[b * K * K + e];
      acc += d * d;
      n += scalar_t(1);
    }
  const scalar_t total = block_sum(acc, scratch);
  const scalar_t count = block_sum(n, scratch);
  if (threadIdx.x == 0) {
    sums[b] = total;
    n_valid[b] = static_cast<int64_t>(count);
  }
}

template <typename scalar_t>
__global__ void idd_loss_backward_kernel_impl(const scalar_t* __restrict__ ds, const scalar_t* __restrict__ dt,
                                              const int64_t* __restrict__ cs, const int64_t* __restrict__ ct,
                                              const scalar_t* __restrict__ scale, int64_t K, int64_t total,
                                              scalar_t* __restrict__ out) {
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // (b, i, j) is one entry of the student's matrices
    const int64_t b = e / (K * K), i = (e / K) % K, j = e % K;
    out[e] = idd_pair_valid(cs + b * K, ct + b * K, i, j) ? scale[b] * scalar_t(2) * (ds[e] - dt[e]) : scalar_t(0);
  }
}

std::tuple<at::Tensor, at::Tensor> idd_pair_sums(const at::Tensor& ds, const at::Tensor& dt, const at::Tensor& cs,
                                                 const at::Tensor& ct) {
  const int64_t B = ds.size(0), K = ds.size(1);
  at::Tensor sums = at::zeros({B}, ds.options());
  at::Tensor n_valid = at::zeros({B}, cs.options());
  if (B == 0) return {sums, n_valid};
  AT_DISPATCH_FLOATING_TYPES(ds.scalar_type(), "idd_loss_cuda", [&] {
    idd_pair_sums_kernel<scalar_t><<<B, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ds.const_data_ptr<scalar_t>(), dt.const_data_ptr<scalar_t>(), cs.const_data_ptr<int64_t>(),
        ct.const_data_ptr<int64_t>(), K, sums.data_ptr<scalar_t>(), n_valid.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, n_valid};
}

at::Tensor idd_loss_kernel(const at::Tensor& student_dist, const at::Tensor& teacher_dist,
                           const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                           c10::string_view reduction) {
  const Reduction red = parse_reduction(std::string(reduction));
  const c10::cuda::CUDAGuard guard(student_dist.device());
  const at::Tensor ds = student_dist.contiguous();
  auto [sums, n_valid] = idd_pair_sums(ds, teacher_dist.to(ds.scalar_type()).contiguous(),
                                       student_counts.contiguous(), teacher_counts.contiguous());
  return idd_reduce(sums, n_valid, red);
}

at::Tensor idd_loss_backward_kernel(const at::Tensor& grad, const at::Tensor& student_dist,
                                    const at::Tensor& teacher_dist, const at::Tensor& student_counts,
                                    const at::Tensor& teacher_counts, c10::string_view reduction) {
  const Reduction red = parse_reduction(std::string(reduction));
  const c10::cuda::CUDAGuard guard(student_dist.device());
  const at::Tensor ds = student_dist.contiguous();
  const at::Tensor dt = teacher_dist.to(ds.scalar_type()).contiguous();
  const at::Tensor cs = student_counts.contiguous(), ct = teacher_counts.contiguous();
  const int64_t B = ds.size(0), K = ds.size(1);
  const at::Tensor scale = idd_image_scale(grad.to(ds.scalar_type()), std::get<1>(idd_pair_sums(ds, dt, cs, ct)), red, B);
  at::Tensor out = at::empty_like(ds);
  const int64_t total = out.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(ds.scalar_type(), "idd_loss_backward_cuda", [&] {
    idd_loss_backward_kernel_impl<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        ds.const_data_ptr<scalar_t>(), dt.const_data_ptr<scalar_t>(), cs.const_data_ptr<int64_t>(),
        ct.const_data_ptr<int64_t>(), scale.const_data_ptr<scalar_t>(), K, total, out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("idd_loss", &idd_loss_kernel);
  m.impl("_idd_loss_backward", &idd_loss_backward_kernel);
}

}  // namespace idd_ops
