// Pixel KD reduced in one op on CUDA (_pixel_kd_sum, behind IDD_OPS_CUDA_NEXT: chosen in Python by
// idd_ops._switches.pixel_kd_sum_path), two launches a forward+backward where the unfused route
// (softmax_kl, then the mask, the sums, the count's clamp and the division, each an ATen launch,
// and their backwards) took about 13: every pixel's vector and the block's sums of the kept ones,
// which the grid's last block adds and scales (kl_pixels_sum_forward), and the backward's walk
// with the scaled gradient formed per pixel (kl_pixels_sum_backward). The per-pixel walks are
// softmax_kl's (softmax_kl_pixels.cuh), so a kept pixel's KL and log-sum-exps are its bits.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>

#include "../common/pixel_kd_sum.h"
#include "cuda_utils.cuh"
#include "grid_tickets.cuh"
#include "softmax_kl_pixels.cuh"

namespace idd_ops {
namespace {

// The parts of kl_pixels_sum_forward added in a fixed order (one block); factor = T^2 / max(kept,
// 1) where `mean`, else T^2; loss = sum * factor in the accumulation dtype. `scratch`: kThreads
// doubles of shared memory.
template <typename acc_t>
__device__ void finish_kl_sum(const double* __restrict__ part_kl, const double* __restrict__ part_n, int64_t parts,
                              double square, bool mean, acc_t* __restrict__ loss, double* __restrict__ factor,
                              double* scratch) {
  double sum = 0, kept = 0;
  for (int64_t p = threadIdx.x; p < parts; p += kThreads) {
    sum += part_kl[p];
    kept += part_n[p];
  }
  sum = block_sum(sum, scratch);
  kept = block_sum(kept, scratch);
  if (threadIdx.x == 0) {
    const double f = mean ? square / (kept > 1 ? kept : 1.0) : square;
    *factor = f;
    *loss = static_cast<acc_t>(sum * f);
  }
}

// IDD_OPS_CUDA_NEXT (_pixel_kd_sum): every pixel's vector as kl_pixels_forward walks it, with
// its log-sum-exps (the backward reads them at the pixels left out too, as softmax_kl's does:
// a NaN logit there gives the unfused route's NaN gradient), and the block's sums of the KL
// (float64) of the pixels whose slot is >= 0 and of their number into part_kl, part_n
// [gridDim.y * gridDim.x] (each block's threads added in a fixed order), which the grid's last
// block (counter: grid_tickets.cuh) adds in order into loss and factor: the same bits on every
// run.
// Blocks per SM: one fewer than kl_pixels_forward's 6 for float32 accumulation, whose 40 registers
// a thread the two float64 sums pass (ptxas, sm_90: 24 bytes spilled at 6; none at 5).
template <typename acc_t>
constexpr int pixel_sum_forward_blocks_per_sm() {
  return sizeof(acc_t) == 8 ? 3 : 5;
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, pixel_sum_forward_blocks_per_sm<at::opmath_type<scalar_t>>())
    kl_pixels_sum_forward(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                          const int16_t* __restrict__ slots, int64_t outer, int64_t length, int64_t inner,
                          at::opmath_type<scalar_t> inv_T, double* __restrict__ lse_s, double* __restrict__ lse_t,
                          double* __restrict__ part_kl, double* __restrict__ part_n, double square, bool mean,
                          at::opmath_type<scalar_t>* __restrict__ loss, double* __restrict__ factor,
                          unsigned* __restrict__ counter) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double scratch[kThreads];
  __shared__ bool last;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  double sum = 0, kept = 0;
  if (i < inner) {  // no early return: every thread takes part in the block's sums
    for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
      const int64_t k = o * inner + i;
      const SoftmaxKLVector<acc_t> r = pixel_vector(s, t, o * length * inner + i, length, inner, inv_T);
      lse_s[k] = r.lse_s;
      lse_t[k] = r.lse_t;
      if (slots == nullptr || slots[k] >= 0) {
        sum += static_cast<double>(r.kl);
        kept += 1;
      }
    }
  }
  sum = block_sum(sum, scratch);
  kept = block_sum(kept, scratch);
  if (threadIdx.x == 0) {
    const int64_t part = static_cast<int64_t>(blockIdx.y) * gridDim.x + blockIdx.x;
    part_kl[part] = sum;
    part_n[part] = kept;
  }
  const unsigned parts = gridDim.x * gridDim.y;
  if (last_to_arrive(counter, parts, &last)) finish_kl_sum(part_kl, part_n, parts, square, mean, loss, factor, scratch);
}

// IDD_OPS_CUDA_NEXT (_pixel_kd_sum's backward): grad and factor are 0-dim.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads, pixel_backward_blocks_per_sm<VEC>())
    kl_pixels_sum_backward(const at::opmath_type<scalar_t>* __restrict__ grad, const double* __restrict__ factor,
                           const int16_t* __restrict__ slots, bool packed_slots, const scalar_t* __restrict__ s,
                           const scalar_t* __restrict__ t, const double* __restrict__ lse_s,
                           const double* __restrict__ lse_t, bool packed_lse, int64_t outer, int64_t length,
                           int64_t inner, at::opmath_type<scalar_t> inv_T, scalar_t* __restrict__ out) {
  pixels_backward<scalar_t, VEC, true>(grad, 0, 0, packed_slots, factor, slots, s, t, lse_s, lse_t, packed_lse, outer,
                                       length, inner, inv_T, out);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> pixel_kd_sum_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const std::optional<at::Tensor>& slots_in, double temperature,
    bool mean) {
  check_pixel_kd_sum_inputs(student, teacher, slots_in, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const at::Tensor slots = slots_in ? slots_in->contiguous() : at::Tensor();
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto options = s.options().dtype(acc_dtype(s.scalar_type())), wide = s.options().dtype(at::kDouble);
  at::Tensor loss = at::empty({}, options), factor = at::empty({}, wide);
  at::Tensor lse_s = at::empty({outer, inner}, wide), lse_t = at::empty({outer, inner}, wide);
  if (s.numel() == 0) {  // no pixels, or no classes: a loss of 0 and softmax_kl's zeros, as the composite's
    lse_s.zero_(), lse_t.zero_();
    return {loss.zero_(), lse_s, lse_t, pixel_kd_sum_factor(slots_in, outer * inner, temperature, mean, wide)};
  }
  const dim3 grid = kl_pixel_grid(outer, inner, 1);
  const int64_t parts = static_cast<int64_t>(grid.x) * grid.y;
  at::Tensor part_kl = at::empty({parts}, wide), part_n = at::empty({parts}, wide);
  const at::Tensor counters = grid_ticket_counters(s.device(), 1);
  auto* counter = reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "pixel_kd_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    kl_pixels_sum_forward<scalar_t><<<grid, kThreads, 0, stream>>>(
        s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(),
        slots.defined() ? slots.const_data_ptr<int16_t>() : nullptr, outer, length, inner,
        static_cast<acc_t>(1.0 / temperature), lse_s.data_ptr<double>(), lse_t.data_ptr<double>(),
        part_kl.data_ptr<double>(), part_n.data_ptr<double>(), temperature * temperature, mean,
        loss.data_ptr<acc_t>(), factor.data_ptr<double>(), counter);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse_s, lse_t, factor};
}

at::Tensor pixel_kd_sum_backward_cuda(const at::Tensor& grad_in, const at::Tensor& student, const at::Tensor& teacher,
                                      const std::optional<at::Tensor>& slots_in, const at::Tensor& lse_student,
                                      const at::Tensor& lse_teacher, const at::Tensor& factor, double temperature) {
  check_pixel_kd_sum_backward_inputs(grad_in, student, teacher, slots_in, lse_student, lse_teacher, factor,
                                     temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const at::Tensor grad = grad_in.to(acc_dtype(s.scalar_type()));
  const at::Tensor slots = slots_in ? slots_in->contiguous() : at::Tensor();
  const at::Tensor ls = lse_student.contiguous(), lt = lse_teacher.contiguous();
  at::Tensor out = at::empty_like(s);
  if (s.numel() == 0) return out;
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "pixel_kd_sum_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const double *lsp = ls.const_data_ptr<double>(), *ltp = lt.const_data_ptr<double>();
      const bool packed_slots = VEC > 1 && slots.defined() &&
                                aligned_for(slots.const_data_ptr<int16_t>(), VEC, sizeof(int16_t));
      const dim3 grid = kl_pixels_backward_grid(outer, length, inner, VEC);
      kl_pixels_sum_backward<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
          grad.const_data_ptr<acc_t>(), factor.const_data_ptr<double>(),
          slots.defined() ? slots.const_data_ptr<int16_t>() : nullptr, packed_slots, sp, tp, lsp, ltp,
          kl_packed_lse(lsp, ltp, VEC), outer, length, inner, static_cast<acc_t>(1.0 / temperature), op);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (kl_use_packs<scalar_t>(length, inner, {sp, tp, op}))
      launch(std::integral_constant<int, pack_size<scalar_t>()>());
    else
      launch(std::integral_constant<int, 1>());
  });
  return out;
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("_pixel_kd_sum", &pixel_kd_sum_cuda);
  m.impl("_pixel_kd_sum_backward", &pixel_kd_sum_backward_cuda);
}

}  // namespace idd_ops
