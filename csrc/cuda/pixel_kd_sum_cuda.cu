// Pixel KD reduced in one op on CUDA (_pixel_kd_sum, behind IDD_OPS_CUDA_NEXT: chosen in Python by
// idd_ops._switches.pixel_kd_sum_path), two launches a forward+backward where the unfused route
// (softmax_kl, then the mask, the sums, the count's clamp and the division, each an ATen launch,
// and their backwards) took about 13: every pixel's vector and the block's sums of the kept ones,
// which the grid's last block adds and scales (kl_pixels_sum_forward), and the backward's walk
// with the scaled gradient formed per pixel (kl_pixels_sum_backward). The per-pixel walks are
// softmax_kl's (softmax_kl_pixels.cuh), so a kept pixel's KL and log-sum-exps are its bits. Over
// contiguous vectors (inner == 1: CWD's rows, IDD_OPS_CUDA_NEXT) the same with softmax_kl's row
// walks (softmax_kl_rows.cuh): kl_rows_sum_forward and kl_rows_sum_backward.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <optional>
#include <utility>

#include "../common/pixel_kd_sum.h"
#include "cuda_utils.cuh"
#include "grid_tickets.cuh"
#include "softmax_kl_pixels.cuh"
#include "softmax_kl_rows.cuh"

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

// IDD_OPS_CUDA_NEXT (_pixel_kd_sum over contiguous vectors, inner == 1: CWD's [B*C, H*W, 1]
// rows): every row as kl_rows_forward walks it (a warp, or a block for long rows), with its
// log-sum-exps, and the block's sums of the KL (float64) of its rows whose slot is >= 0 (every
// row without slots), in row order, and of their number into part_kl, part_n [gridDim.x], which
// the grid's last block adds in order into loss and factor.
template <typename scalar_t, int VEC, int ROW_THREADS>
__global__ void __launch_bounds__(kThreads)
    kl_rows_sum_forward(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                        const int16_t* __restrict__ slots, int64_t outer, int64_t length,
                        at::opmath_type<scalar_t> inv_T, double* __restrict__ lse_s, double* __restrict__ lse_t,
                        double* __restrict__ part_kl, double* __restrict__ part_n, double square, bool mean,
                        at::opmath_type<scalar_t>* __restrict__ loss, double* __restrict__ factor,
                        unsigned* __restrict__ counter) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRows = kThreads / ROW_THREADS;
  __shared__ double row_kl[kRows], row_kept[kRows];
  __shared__ double scratch[kThreads];
  __shared__ bool last;
  const int r = threadIdx.x / ROW_THREADS;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + r;
  const OnlineSoftmaxKL<acc_t> st = row_sums<scalar_t, VEC, ROW_THREADS>(s, t, row, outer, length, inv_T);
  if (threadIdx.x % ROW_THREADS == 0) {
    double kl = 0, kept = 0;
    if (row < outer) {
      const SoftmaxKLVector<acc_t> v = st.finish();
      lse_s[row] = v.lse_s;
      lse_t[row] = v.lse_t;
      if (slots == nullptr || slots[row] >= 0) {
        kl = static_cast<double>(v.kl);
        kept = 1;
      }
    }
    row_kl[r] = kl;
    row_kept[r] = kept;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    double sum = 0, kept = 0;
    for (int k = 0; k < kRows; ++k) {
      sum += row_kl[k];
      kept += row_kept[k];
    }
    part_kl[blockIdx.x] = sum;
    part_n[blockIdx.x] = kept;
  }
  if (last_to_arrive(counter, gridDim.x, &last))
    finish_kl_sum(part_kl, part_n, gridDim.x, square, mean, loss, factor, scratch);
}

// IDD_OPS_CUDA_NEXT (_pixel_kd_sum's backward over rows): kl_rows_backward's walk with the row's
// gradient grad[0] * factor[0] where its slot is >= 0 (every row without slots) and 0 elsewhere,
// rounded to the accumulation dtype once, as pixels_backward forms it.
template <typename scalar_t, int VEC, int ROW_THREADS>
__global__ void __launch_bounds__(kThreads)
    kl_rows_sum_backward(const at::opmath_type<scalar_t>* __restrict__ grad, const double* __restrict__ factor,
                         const int16_t* __restrict__ slots, const scalar_t* __restrict__ s,
                         const scalar_t* __restrict__ t, const double* __restrict__ lse_s,
                         const double* __restrict__ lse_t, int64_t outer, int64_t length,
                         at::opmath_type<scalar_t> inv_T, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRows = kThreads / ROW_THREADS;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / ROW_THREADS;
  if (row >= outer) return;  // no block-wide synchronisation below
  const acc_t scaled = static_cast<acc_t>(static_cast<double>(grad[0]) * factor[0]);
  const acc_t g = slots == nullptr || slots[row] >= 0 ? scaled : acc_t(0);
  row_backward<scalar_t, VEC, ROW_THREADS>(g * inv_T, s, t, lse_s, lse_t, row, length, inv_T, out);
}

// Calls f(std::integral_constant<int, VEC>, std::integral_constant<int, ROW_THREADS>) with the
// row kernels' shape for rows of `length`: 16-byte packs where pointers and length allow them, and
// with_row_threads' threads a row.
template <typename scalar_t, typename F>
void with_row_shape(int64_t length, std::initializer_list<const void*> pointers, F&& f) {
  const auto by_rows = [&](auto vec) {
    with_row_threads<decltype(vec)::value>(length, [&](auto row_threads) { f(vec, row_threads); });
  };
  if (kl_use_packs<scalar_t>(length, 1, pointers))
    by_rows(std::integral_constant<int, pack_size<scalar_t>()>());
  else
    by_rows(std::integral_constant<int, 1>());
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
  const at::Tensor counters = grid_ticket_counters(s.device(), 1);
  auto* counter = reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int>());
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "pixel_kd_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const int16_t* sl = slots.defined() ? slots.const_data_ptr<int16_t>() : nullptr;
    const auto inv_T = static_cast<acc_t>(1.0 / temperature);
    // the blocks' parts, from the caching allocator: valid for the launches queued on this stream
    const auto parts = [&](int64_t n) { return std::make_pair(at::empty({n}, wide), at::empty({n}, wide)); };
    if (inner > 1) {
      const dim3 grid = kl_pixel_grid(outer, inner, 1);
      const auto [part_kl, part_n] = parts(static_cast<int64_t>(grid.x) * grid.y);
      kl_pixels_sum_forward<scalar_t><<<grid, kThreads, 0, stream>>>(
          sp, tp, sl, outer, length, inner, inv_T, lse_s.data_ptr<double>(), lse_t.data_ptr<double>(),
          part_kl.data_ptr<double>(), part_n.data_ptr<double>(), temperature * temperature, mean,
          loss.data_ptr<acc_t>(), factor.data_ptr<double>(), counter);
    } else {
      with_row_shape<scalar_t>(length, {sp, tp}, [&](auto vec, auto row_threads) {
        constexpr int VEC = decltype(vec)::value, ROW_THREADS = decltype(row_threads)::value;
        const unsigned blocks = row_grid(outer, kThreads / ROW_THREADS);
        const auto [part_kl, part_n] = parts(blocks);
        kl_rows_sum_forward<scalar_t, VEC, ROW_THREADS><<<blocks, kThreads, 0, stream>>>(
            sp, tp, sl, outer, length, inv_T, lse_s.data_ptr<double>(), lse_t.data_ptr<double>(),
            part_kl.data_ptr<double>(), part_n.data_ptr<double>(), temperature * temperature, mean,
            loss.data_ptr<acc_t>(), factor.data_ptr<double>(), counter);
      });
    }
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
    const double *lsp = ls.const_data_ptr<double>(), *ltp = lt.const_data_ptr<double>();
    const int16_t* sl = slots.defined() ? slots.const_data_ptr<int16_t>() : nullptr;
    const auto inv_T = static_cast<acc_t>(1.0 / temperature);
    if (inner == 1) {
      with_row_shape<scalar_t>(length, {sp, tp, op}, [&](auto vec, auto row_threads) {
        constexpr int VEC = decltype(vec)::value, ROW_THREADS = decltype(row_threads)::value;
        kl_rows_sum_backward<scalar_t, VEC, ROW_THREADS><<<row_grid(outer, kThreads / ROW_THREADS), kThreads, 0, stream>>>(
            grad.const_data_ptr<acc_t>(), factor.const_data_ptr<double>(), sl, sp, tp, lsp, ltp, outer, length, inv_T,
            op);
      });
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const auto launch = [&](auto vec) {
      constexpr int VEC = decltype(vec)::value;
      const bool packed_slots = VEC > 1 && sl != nullptr && aligned_for(sl, VEC, sizeof(int16_t));
      const dim3 grid = kl_pixels_backward_grid(outer, length, inner, VEC);
      kl_pixels_sum_backward<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(
          grad.const_data_ptr<acc_t>(), factor.const_data_ptr<double>(), sl, packed_slots, sp, tp, lsp, ltp,
          kl_packed_lse(lsp, ltp, VEC), outer, length, inner, inv_T, op);
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
