// KL between temperature softmaxes along the middle dim of [outer, length, inner] tensors, on CUDA.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <limits>

#include "../common/checks.h"
#include "../common/cuda_next.h"
#include "../common/softmax_kl.h"
#include "cuda_utils.cuh"
#include "next_kernels.cuh"

namespace idd_ops {
namespace {

template <typename acc_t>
__device__ __forceinline__ void write_stats(acc_t ms, acc_t mt, const SoftmaxKLSums<acc_t>& sums, acc_t inv_T,
                                            int64_t k, acc_t* kl, double* lse_s, double* lse_t) {
  const auto r = softmax_kl_vector(ms, mt, sums.zs, sums.zt, sums.w, inv_T);
  kl[k] = r.kl, lse_s[k] = r.lse_s, lse_t[k] = r.lse_t;
}

// Strided vectors (inner > 1): one thread per (o, i); neighbouring threads read neighbouring
// addresses at every step along the vector.
template <typename scalar_t>
__global__ void softmax_kl_strided_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                          int64_t outer, int64_t length, int64_t inner, at::opmath_type<scalar_t> inv_T,
                                          at::opmath_type<scalar_t>* kl, double* lse_s, double* lse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t k = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; k < outer * inner;
       k += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // (o, i) is one vector
    const int64_t o = k / inner, i = k % inner, base = o * length * inner + i;
    acc_t ms = -std::numeric_limits<acc_t>::infinity(), mt = ms;
    for (int64_t c = 0; c < length; ++c) {
      ms = max(ms, static_cast<acc_t>(s[base + c * inner]));
      mt = max(mt, static_cast<acc_t>(t[base + c * inner]));
    }
    SoftmaxKLSums<acc_t> sums;
    const acc_t shift_s = sum_shift(ms), shift_t = sum_shift(mt);
    for (int64_t c = 0; c < length; ++c)
      sums.add((static_cast<acc_t>(t[base + c * inner]) - shift_t) * inv_T,
               (static_cast<acc_t>(s[base + c * inner]) - shift_s) * inv_T);
    write_stats(ms, mt, sums, inv_T, k, kl, lse_s, lse_t);
  }
}

// Contiguous vectors (inner == 1): one block per vector, block reductions.
template <typename scalar_t>
__global__ void softmax_kl_rows_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t length,
                                       at::opmath_type<scalar_t> inv_T, at::opmath_type<scalar_t>* kl,
                                       double* lse_s, double* lse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t scratch[kThreads];
  const int64_t o = blockIdx.x, base = o * length;
  acc_t ms = -std::numeric_limits<acc_t>::infinity(), mt = ms;
  for (int64_t c = threadIdx.x; c < length; c += blockDim.x) {
    ms = max(ms, static_cast<acc_t>(s[base + c]));
    mt = max(mt, static_cast<acc_t>(t[base + c]));
  }
  ms = block_max(ms, scratch);
  mt = block_max(mt, scratch);
  SoftmaxKLSums<acc_t> sums;
  const acc_t shift_s = sum_shift(ms), shift_t = sum_shift(mt);
  for (int64_t c = threadIdx.x; c < length; c += blockDim.x)
    sums.add((static_cast<acc_t>(t[base + c]) - shift_t) * inv_T, (static_cast<acc_t>(s[base + c]) - shift_s) * inv_T);
  sums.zt = block_sum(sums.zt, scratch);
  sums.zs = block_sum(sums.zs, scratch);
  sums.w = block_sum(sums.w, scratch);
  if (threadIdx.x == 0) write_stats(ms, mt, sums, inv_T, o, kl, lse_s, lse_t);
}

template <typename scalar_t>
__global__ void softmax_kl_backward_kernel_impl(const at::opmath_type<scalar_t>* __restrict__ grad,
                                                const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                                                const double* __restrict__ lse_s,
                                                const double* __restrict__ lse_t, int64_t length,
                                                int64_t inner, int64_t total, at::opmath_type<scalar_t> inv_T,
                                                scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    // (o, c, i) is one element; k = (o, i) its vector
    const int64_t k = (e / (length * inner)) * inner + e % inner;
    const acc_t ps = probability(static_cast<acc_t>(s[e]) * inv_T, split_lse<acc_t>(lse_s[k]));
    const acc_t pt = probability(static_cast<acc_t>(t[e]) * inv_T, split_lse<acc_t>(lse_t[k]));
    out[e] = static_cast<scalar_t>(grad[k] * inv_T * (ps - pt));
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_kernel(const at::Tensor& student, const at::Tensor& teacher,
                                                                double temperature) {
  check_softmax_kl_inputs(student, teacher, temperature);
  if (cuda_next_enabled()) return softmax_kl_next(student, teacher, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto acc = acc_dtype(s.scalar_type());
  at::Tensor kl = at::zeros({outer, inner}, s.options().dtype(acc));
  at::Tensor lse_s = at::zeros_like(kl, kl.options().dtype(at::kDouble)), lse_t = at::zeros_like(lse_s);
  if (s.numel() == 0) return {kl, lse_s, lse_t};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    if (inner == 1) {
      softmax_kl_rows_kernel<scalar_t><<<grid_x(outer, "student"), kThreads, 0, stream>>>(
          s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), length, inv_T, kl.data_ptr<acc_t>(),
          lse_s.data_ptr<double>(), lse_t.data_ptr<double>());
    } else {
      softmax_kl_strided_kernel<scalar_t><<<blocks_for(outer * inner), kThreads, 0, stream>>>(
          s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), outer, length, inner, inv_T,
          kl.data_ptr<acc_t>(), lse_s.data_ptr<double>(), lse_t.data_ptr<double>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {kl, lse_s, lse_t};
}

at::Tensor softmax_kl_backward_kernel(const at::Tensor& grad_in, const at::Tensor& student, const at::Tensor& teacher,
                                     const at::Tensor& lse_student, const at::Tensor& lse_teacher, double temperature) {
  check_softmax_kl_backward_inputs(grad_in, student, teacher, lse_student, lse_teacher, temperature);
  if (cuda_next_enabled()) return softmax_kl_backward_next(grad_in, student, teacher, lse_student, lse_teacher, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const auto acc = acc_dtype(s.scalar_type());
  const at::Tensor grad = grad_in.to(acc).contiguous();
  const at::Tensor ls = lse_student.contiguous(), lt = lse_teacher.contiguous();
  at::Tensor out = at::empty_like(s);
  const int64_t total = s.numel();
  if (total == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    softmax_kl_backward_kernel_impl<scalar_t><<<blocks_for(total), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.const_data_ptr<acc_t>(), s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
        ls.const_data_ptr<double>(), lt.const_data_ptr<double>(), s.size(1), s.size(2), total,
        static_cast<acc_t>(1.0 / temperature), out.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("softmax_kl", &softmax_kl_kernel);
  m.impl("_softmax_kl_backward", &softmax_kl_backward_kernel);
}

}  // namespace idd_ops
