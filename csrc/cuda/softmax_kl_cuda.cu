// KL between temperature softmaxes along the middle dim of [outer, length, inner] tensors, on CUDA,
// in one read of student and teacher per pass:
// an online softmax (common/softmax_kl_online.h) forward and a one-read backward, for both
// layouts the op serves:
//   pixel KD [B, K, H*W] (inner > 1): in the forward a thread owns a pixel and walks the K
//     classes in chunks held in registers, every load of a chunk in flight at once; the
//     backward streams the tensors in memory order, a 16-byte pack per thread;
//   CWD [B*C, H*W, 1] (inner == 1): a block (long rows) or a warp (short rows) per row, 16-byte
//     packs along the row, partial sums merged by shuffles.
// One launch per pass; outputs are written, never zero-filled first.
//
// Bytes and predicted H200 time (4.8 TB/s datasheet; memory-bound: about 2.3 exp and 15 other
// flops per element, far under the FP32/MUFU rates), float32 at benchmarks/cases.py's shapes:
//   pixel KD B=8 K=19 512x1024: forward reads s, t 2 x 318.8 MB, writes kl 16.8 MB and the
//     float64 lse_s, lse_t 2 x 33.6 MB = 722 MB: 0.15 ms (the earlier two-pass kernel read s,
//     t twice: 1.33 GB, plus three zero fills); backward reads s, t and the three per-pixel
//     values, writes the gradient: 1040 MB, 0.22 ms.
//   CWD B=8 C=512 64x128: forward 268 MB: 0.056 ms; backward 403 MB: 0.084 ms.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/checks.h"
#include "../common/softmax_kl_online.h"
#include "cuda_utils.cuh"
#include "softmax_kl_pixels.cuh"
#include "softmax_kl_rows.cuh"
#include "vectorized.cuh"

namespace idd_ops {
namespace {

// ---- vectors along a strided dim (inner > 1): pixel KD (the walks: softmax_kl_pixels.cuh) -----

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, pixel_forward_blocks_per_sm<at::opmath_type<scalar_t>>())
    kl_pixels_forward(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t outer, int64_t length,
                      int64_t inner, at::opmath_type<scalar_t> inv_T, at::opmath_type<scalar_t>* __restrict__ kl,
                      double* __restrict__ lse_s, double* __restrict__ lse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= inner) return;  // no block-wide synchronisation below
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const SoftmaxKLVector<acc_t> r = pixel_vector(s, t, o * length * inner + i, length, inner, inv_T);
    const int64_t k = o * inner + i;
    kl[k] = r.kl;
    lse_s[k] = r.lse_s;
    lse_t[k] = r.lse_t;
  }
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads, pixel_backward_blocks_per_sm<VEC>())
    kl_pixels_backward(const at::opmath_type<scalar_t>* __restrict__ grad, int64_t g_outer, int64_t g_inner,
                       bool packed_grad, const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                       const double* __restrict__ lse_s, const double* __restrict__ lse_t, bool packed_lse,
                       int64_t outer,
                       int64_t length, int64_t inner, at::opmath_type<scalar_t> inv_T, scalar_t* __restrict__ out) {
  pixels_backward<scalar_t, VEC, false>(grad, g_outer, g_inner, packed_grad, nullptr, nullptr, s, t, lse_s, lse_t,
                                        packed_lse, outer, length, inner, inv_T, out);
}

// ---- contiguous vectors (inner == 1): CWD rows (the walks: softmax_kl_rows.cuh) -------------

template <typename scalar_t, int VEC, int ROW_THREADS>
__global__ void __launch_bounds__(kThreads)
    kl_rows_forward(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t outer, int64_t length,
                    at::opmath_type<scalar_t> inv_T, at::opmath_type<scalar_t>* __restrict__ kl,
                    double* __restrict__ lse_s, double* __restrict__ lse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRows = kThreads / ROW_THREADS;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / ROW_THREADS;
  const int lane = threadIdx.x % ROW_THREADS;
  OnlineSoftmaxKL<acc_t> st = row_sums<scalar_t, VEC, ROW_THREADS>(s, t, row, outer, length, inv_T);
  if (lane == 0 && row < outer) {
    const SoftmaxKLVector<acc_t> r = st.finish();
    kl[row] = r.kl;
    lse_s[row] = r.lse_s;
    lse_t[row] = r.lse_t;
  }
}

template <typename scalar_t, int VEC, int ROW_THREADS>
__global__ void __launch_bounds__(kThreads)
    kl_rows_backward(const at::opmath_type<scalar_t>* __restrict__ grad, int64_t g_outer, int64_t g_inner,
                       const scalar_t* __restrict__ s,
                     const scalar_t* __restrict__ t, const double* __restrict__ lse_s,
                     const double* __restrict__ lse_t, int64_t outer, int64_t length,
                     at::opmath_type<scalar_t> inv_T, scalar_t* __restrict__ out) {
  constexpr int kRows = kThreads / ROW_THREADS;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / ROW_THREADS;
  if (row >= outer) return;  // no block-wide synchronisation below
  row_backward<scalar_t, VEC, ROW_THREADS>(grad[row * g_outer] * inv_T, s, t, lse_s, lse_t, row, length, inv_T, out);
}

// ---- host side -----------------------------------------------------------------------------

template <typename scalar_t, int VEC>
void launch_forward(const scalar_t* s, const scalar_t* t, int64_t outer, int64_t length, int64_t inner,
                    at::opmath_type<scalar_t> inv_T, at::opmath_type<scalar_t>* kl, double* lse_s, double* lse_t,
                    cudaStream_t stream) {
  if (inner > 1) {  // a pixel per thread, whatever the packs allow (kl_pixels_forward)
    kl_pixels_forward<scalar_t><<<kl_pixel_grid(outer, inner, 1), kThreads, 0, stream>>>(s, t, outer, length, inner,
                                                                                      inv_T, kl, lse_s, lse_t);
  } else {
    with_row_threads<VEC>(length, [&](auto row_threads) {
      constexpr int ROW_THREADS = decltype(row_threads)::value;
      kl_rows_forward<scalar_t, VEC, ROW_THREADS><<<row_grid(outer, kThreads / ROW_THREADS), kThreads, 0, stream>>>(
          s, t, outer, length, inv_T, kl, lse_s, lse_t);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_backward(const at::opmath_type<scalar_t>* grad, int64_t g_outer, int64_t g_inner, const scalar_t* s,
                     const scalar_t* t, const double* lse_s, const double* lse_t, int64_t outer, int64_t length,
                     int64_t inner,
                     at::opmath_type<scalar_t> inv_T, scalar_t* out, cudaStream_t stream) {
  if (inner > 1) {
    using acc_t = at::opmath_type<scalar_t>;
    // packs of the per-pixel values where every pack starts aligned (i and inner are multiples of VEC)
    const bool packed_grad = VEC > 1 && g_inner == 1 && g_outer % VEC == 0 && aligned_for(grad, VEC, sizeof(acc_t));
    kl_pixels_backward<scalar_t, VEC><<<kl_pixels_backward_grid(outer, length, inner, VEC), kThreads, 0, stream>>>(
        grad, g_outer, g_inner, packed_grad, s, t, lse_s, lse_t, kl_packed_lse(lse_s, lse_t, VEC), outer, length, inner,
        inv_T, out);
  } else {
    with_row_threads<VEC>(length, [&](auto row_threads) {
      constexpr int ROW_THREADS = decltype(row_threads)::value;
      kl_rows_backward<scalar_t, VEC, ROW_THREADS><<<row_grid(outer, kThreads / ROW_THREADS), kThreads, 0, stream>>>(
          grad, g_outer, g_inner, s, t, lse_s, lse_t, outer, length, inv_T, out);
    });
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_kernel(const at::Tensor& student, const at::Tensor& teacher,
                                                                double temperature) {
  check_softmax_kl_inputs(student, teacher, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto options = s.options().dtype(acc_dtype(s.scalar_type()));
  if (s.numel() == 0) {  // length 0 leaves [outer, inner] outputs with nothing summed: zeros
    at::Tensor kl = at::zeros({outer, inner}, options), lse = at::zeros({outer, inner}, options.dtype(at::kDouble));
    return {kl, lse, at::zeros_like(lse)};
  }
  at::Tensor kl = at::empty({outer, inner}, options);
  at::Tensor lse_s = at::empty_like(kl, options.dtype(at::kDouble)), lse_t = at::empty_like(lse_s);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    if (kl_use_packs<scalar_t>(length, inner, {sp, tp}))
      launch_forward<scalar_t, pack_size<scalar_t>()>(sp, tp, outer, length, inner, inv_T, kl.data_ptr<acc_t>(),
                                                      lse_s.data_ptr<double>(), lse_t.data_ptr<double>(), stream);
    else
      launch_forward<scalar_t, 1>(sp, tp, outer, length, inner, inv_T, kl.data_ptr<acc_t>(),
                                  lse_s.data_ptr<double>(), lse_t.data_ptr<double>(), stream);
  });
  return {kl, lse_s, lse_t};
}

at::Tensor softmax_kl_backward_kernel(const at::Tensor& grad_in, const at::Tensor& student, const at::Tensor& teacher,
                                     const at::Tensor& lse_student, const at::Tensor& lse_teacher, double temperature) {
  check_softmax_kl_backward_inputs(grad_in, student, teacher, lse_student, lse_teacher, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const auto acc = acc_dtype(s.scalar_type());
  // Read in place with its strides: the gradient of a reduced loss arrives expanded (strides 0),
  // and a contiguous copy would be one more launch and pass.
  const at::Tensor grad = grad_in.to(acc);
  const at::Tensor ls = lse_student.contiguous(), lt = lse_teacher.contiguous();  // float64, checked
  at::Tensor out = at::empty_like(s);
  if (s.numel() == 0) return out;
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    const double* lsp = ls.const_data_ptr<double>();
    const double* ltp = lt.const_data_ptr<double>();
    const int64_t g_outer = grad.stride(0), g_inner = grad.stride(1);
    if (kl_use_packs<scalar_t>(length, inner, {sp, tp, op}))
      launch_backward<scalar_t, pack_size<scalar_t>()>(gp, g_outer, g_inner, sp, tp, lsp, ltp, outer, length, inner,
                                                       inv_T, op, stream);
    else
      launch_backward<scalar_t, 1>(gp, g_outer, g_inner, sp, tp, lsp, ltp, outer, length, inner, inv_T, op, stream);
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
