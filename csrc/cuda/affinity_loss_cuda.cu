// SKD (affinity_loss) on CUDA: the batched formulation (affinity_loss.h) with its pointwise work
// in kernels around the GEMMs, per chunk of pool * pool images (the CPU's blocked formulation,
// hundreds of small launches there, made the GPU 9x slower):
//   forward:  pool + normalise + difference, with the sums of S and D over each block's pixels
//             (1) -> the pivot, the means and alpha (1) -> centre on it (1) -> G_xx, G_xd, G_dd
//             (3 GEMMs) -> the four inner products of differenced_affinity_sum, and G_xd's first
//             Ct columns kept for the backward (1); then one launch for all images adds the
//             per-tile partial sums and the pivot's part into the per-image means.
//   backward: the GEMM operands G_xd and G_xy = G_xx - G_xd (1) -> pool, pivot and centre as
//             forward (3) -> u = G_xx m_D + G_xd m_T (1) -> G_xd x and G_xy d (2 GEMMs) ->
//             through the normalisation into each window's argmax, zeros elsewhere (1).
// Centred on the pixels' means, the Grams carry the spread of the features, not an offset they
// share (affinity_pivot). The student's gradient is taken through G_xd x + G_xy d (y = x - d),
// where G_xx x - G_xy y would cancel as the student nears the teacher, so a rounding error of the
// operands stays relative to the gradient (the forward's D keeps the loss so too). G_xd is kept,
// not G_xy: formed again as G_xx - G_xy it would cancel (affinity_saved_gram).
// That lets bfloat16 inputs keep their dtype for the GEMM operands (gemm_operand_t) and multiply
// on tensor cores into float32, as fast as autocast's GEMMs (float32 operands ran 3x slower than
// the eager reference under bf16 autocast on an H200: 17 ms against 5 ms a step). Half keeps
// float32 operands: G_st's entries reach P (past half's 65504 at P > 65504 pooled pixels) and a
// difference near the teacher (|D| ~ 1e-5) is a half subnormal, which bfloat16's float32 range
// avoids; and cuBLAS refuses half operands with float32 results under allow_fp16_accumulation.
// At one chunk that is 8 + 8 launches of the library's kernels and GEMMs, where the ATen
// formulation takes several times as many. The reductions
// run in a fixed order (no atomics): the same bits on every run.
// Student and teacher of different dtypes, and empty inputs, take the ATen formulation.
//
// Threads: a block is 8 pooled pixels x 32 channel groups (a warp: 8 consecutive windows of 4
// channels, at pool 2 a 64-byte run per row and channel); each thread walks its group's channels,
// and the per-pixel sums over channels are added across the groups in shared memory in a fixed
// order. Many groups rather than many pixels: at the Cityscapes shape (P = 2048 pooled pixels, a
// chunk of 4 images, 2048 teacher channels) that is 1024 blocks with 64 channels a thread (about
// 2.6 waves at 3 blocks a multiprocessor: nvcc gives these kernels up to 80 registers a thread on
// sm_90, so 3 fit), where 32 pixels a block would give 256 blocks and 256 channels a thread.
// A thread keeps a window of each network in flight (window_max).
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <torch/version.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/cuda_next.h"
#include "../composite/affinity_loss.h"
#include "affinity_gradient.cuh"
#include "affinity_pivot.cuh"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

using namespace affinity_cuda;

constexpr int kTile = 32;  // the Gram tail's square tiles: kTile columns x kTile rows

// The backward's GEMM operands of a chunk (affinity_gram_operands), in gemm_operand_t, from the
// kept G_ss and G_sd [k, Cs, Ct] (contiguous): g_sd [k, Cs, Cs] = G_sd (past Ct: G_ss, D's rows
// being S's own there) and g_st [k, Cs, Ct] = G_ss - G_sd (past Cs: -G_sd). A grid-stride loop
// over k * Cs * max(Cs, Ct).
template <typename acc_t, typename op_t>
__global__ void gram_operands_kernel(const acc_t* __restrict__ gss, const acc_t* __restrict__ gsd, int64_t k,
                                     int64_t Cs, int64_t Ct, op_t* __restrict__ g_sd, op_t* __restrict__ g_st) {
  const int64_t C = Cs > Ct ? Cs : Ct, n = k * Cs * C;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % C, row = e / C;  // row = image * Cs + i
    const acc_t ss = j < Cs ? gss[row * Cs + j] : acc_t(0);
    const acc_t sd = j < Ct ? gsd[row * Ct + j] : ss;
    if (j < Cs) g_sd[row * Cs + j] = static_cast<op_t>(sd);
    if (j < Ct) g_st[row * Ct + j] = static_cast<op_t>(ss - sd);
  }
}

// The four inner products of differenced_affinity_sum over one kTile x kTile tile of the C x C
// grid, in float64, into partials[b, tile]; and the kept G_sd (its first Ct columns) on the
// tile's part of [Cs, Ct]. g_ss [k, Cs, Cs], g_sd [k, Cs, C], g_dd [k, C, C], kept [k, Cs, Ct],
// contiguous.
// The <G_sd, G_sd^T> term reads the mirror tile through shared memory (coalesced both ways).
// grid (tiles * tiles, k), kThreads threads: thread t takes column t % kTile of its tile and every
// (kThreads / kTile)-th row from t / kTile.
template <typename acc_t>
__global__ void gram_tail_kernel(const acc_t* __restrict__ g_ss, const acc_t* __restrict__ g_sd,
                                 const acc_t* __restrict__ g_dd, acc_t* __restrict__ kept, int64_t Cs, int64_t Ct,
                                 int64_t C, double* __restrict__ partials) {
  constexpr int kRowStep = kThreads / kTile;
  __shared__ acc_t mirror[kTile][kTile + 1];
  __shared__ double scratch[kThreads];
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t b = blockIdx.y, tiles = (C + kTile - 1) / kTile;
  const int64_t i0 = (blockIdx.x / tiles) * kTile, j0 = (blockIdx.x % tiles) * kTile, j = j0 + tx;
  const acc_t* ss = g_ss + b * Cs * Cs;
  const acc_t* sd = g_sd + b * Cs * C;
  const acc_t* dd = g_dd + b * C * C;
  acc_t* kept_b = kept + b * Cs * Ct;
  const bool square = i0 < Cs && j0 < Cs;  // the tile meets G_ss: block-uniform
  if (square) {  // mirror[r][c] = G_sd[j0 + r, i0 + c]
    for (int r = ty; r < kTile; r += kRowStep) {
      const int64_t row = j0 + r, col = i0 + tx;
      mirror[r][tx] = row < Cs && col < Cs ? sd[row * C + col] : acc_t(0);
    }
  }
  __syncthreads();
  double sum = 0;
  for (int r = ty; r < kTile; r += kRowStep) {
    const int64_t i = i0 + r;
    if (i >= C || j >= C) continue;
    const double d = dd[i * C + j];
    sum += d * d;  // <G_dd, G_dd>
    if (i >= Cs) continue;
    const acc_t x = sd[i * C + j];
    sum -= 4 * d * static_cast<double>(x);  // <G_dd[:Cs], G_sd>
    const acc_t s = j < Cs ? ss[i * Cs + j] : acc_t(0);
    if (j < Cs) sum += 2 * (static_cast<double>(s) * d + static_cast<double>(x) * mirror[tx][r]);
    if (j < Ct) kept_b[i * Ct + j] = x;
  }
  sum = block_sum(sum, scratch);  // a fixed-order tree (cuda_utils.cuh)
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = sum;
}

// Per-image means: partials [B, tiles] summed in a fixed order, plus the pivot's part
// P^2 alpha^2 + 2 P sum_i beta_i^2 (pivot_affinity_sum) from beta [B, P] and alpha_parts
// [B, alpha_tiles], clamped at 0 (rounding), over the P * P entries. grid B.
template <typename acc_t>
__global__ void affinity_means_kernel(const double* __restrict__ partials, int64_t tiles,
                                      const double* __restrict__ beta, const double* __restrict__ alpha_parts,
                                      int64_t alpha_tiles, int64_t P, double divisor, acc_t* __restrict__ loss) {
  __shared__ double scratch[kThreads];
  const double* bb = beta + blockIdx.x * P;
  double sum = 0, squares = 0;
  for (int64_t t = threadIdx.x; t < tiles; t += kThreads) sum += partials[blockIdx.x * tiles + t];
  for (int64_t p = threadIdx.x; p < P; p += kThreads) squares += bb[p] * bb[p];
  sum = block_sum(sum, scratch);
  squares = block_sum(squares, scratch);
  if (threadIdx.x == 0) {
    const double alpha = alpha_of(alpha_parts + blockIdx.x * alpha_tiles, alpha_tiles), pixels = P;
    sum += pixels * pixels * alpha * alpha + 2 * pixels * squares;
    loss[blockIdx.x] = static_cast<acc_t>((sum < 0 ? 0 : sum) / divisor);  // NaN stays NaN
  }
}

PoolView pool_view(const at::Tensor& x, int64_t pool) {
  const int64_t W = x.size(3);
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.size(2), W, (W + pool - 1) / pool, pool};
}

// Whether the fused kernels take these inputs (checked by check_affinity_loss_inputs); a chunk's
// images are the grid's y dimension (at most 65535).
bool fused_takes(const at::Tensor& student, const at::Tensor& teacher, int64_t pool) {
  const int64_t B = student.size(0);
  return student.scalar_type() == teacher.scalar_type() && B > 0 && student.size(1) > 0 && teacher.size(1) > 0 &&
         student.size(2) > 0 && student.size(3) > 0 && affinity_chunk_images(pool, B) <= kMaxGridYZ;
}

dim3 pixel_grid(int64_t P, int64_t k) {
  return dim3(static_cast<unsigned>((P + kPixels - 1) / kPixels), static_cast<unsigned>(k));
}

// a @ b in `acc` for operands of gemm_operand_t, into `out` where given. ATen's GEMMs with
// bfloat16 operands and float32 results (tensor cores, float32 accumulation) exist from torch
// 2.8, on CUDA; elsewhere (an older torch, the CUDA emulator's CPU tensors) the operands are
// widened to the accumulation dtype first: the same products.
at::Tensor gram(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc, at::Tensor* out = nullptr) {
  if (a.scalar_type() == acc) return out ? at::bmm_out(*out, a, b) : at::bmm(a, b);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (a.is_cuda()) return out ? at::bmm_out(*out, a, b, acc) : at::bmm(a, b, acc);
#endif
  const at::Tensor wa = a.to(acc), wb = b.to(acc);
  return out ? at::bmm_out(*out, wa, wb) : at::bmm(wa, wb);
}

// Tiles of alpha_parts (pivot_kernel).
int64_t alpha_tiles(int64_t C) { return (C + kThreads - 1) / kThreads; }

// A chunk's pooled, normalised, differenced features centred on its pivot, in gemm_operand_t:
// us = x [k, Cs, P] and d [k, C, P]; the pivot's means m_s [k, Cs] and m_d [k, C]; in the
// backward the student's norms [k, P]; all but x and d float64. Into the chunk's rows of the
// caller's beta [k, P] and alpha_parts [k, alpha_tiles(C)] (contiguous). pooled_sums_kernel,
// pivot_kernel, centred_kernel: three launches.
struct CentredChunk {
  at::Tensor us, d, m_s, m_d, norms;
};

template <typename scalar_t>
CentredChunk centred_chunk(const at::Tensor& student, const PoolView& vs, const at::Tensor& teacher, const PoolView& vt,
                           int64_t b0, int64_t k, bool backward, at::Tensor beta, at::Tensor alpha_parts) {
  using op_t = gemm_operand_t<scalar_t>;
  const int64_t Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const int64_t P = affinity_pooled_pixels(vs.H, vs.W, vs.pool);
  const auto op_opts = student.options().dtype(c10::CppTypeToScalarType<op_t>::value);
  const auto wide = student.options().dtype(at::kDouble);
  const dim3 grid = pixel_grid(P, k), block(kPixels, kGroups);
  const auto stream = at::cuda::getCurrentCUDAStream();
  CentredChunk out;
  out.us = at::empty({k, Cs, P}, op_opts);
  out.d = at::empty({k, C, P}, op_opts);
  out.m_s = at::empty({k, Cs}, wide);
  out.m_d = at::empty({k, C}, wide);
  if (backward) out.norms = at::empty({k, P}, wide);
  at::Tensor stats = at::empty({k, 3, P}, wide), sums = at::empty({k, static_cast<int64_t>(grid.x), Cs + C}, wide);
  const bool next = cuda_next_enabled();
  const auto pooled_sums = next ? pooled_sums_kernel<scalar_t, kPooledAhead> : pooled_sums_kernel<scalar_t, 1>;
  pooled_sums<<<grid, block, 0, stream>>>(
      student.const_data_ptr<scalar_t>() + b0 * vs.s0, vs, teacher.const_data_ptr<scalar_t>() + b0 * vt.s0, vt, Cs,
      Ct, P, out.us.mutable_data_ptr<op_t>(), out.d.mutable_data_ptr<op_t>(), stats.mutable_data_ptr<double>(),
      sums.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 pivot_grid(static_cast<unsigned>(alpha_tiles(C)), static_cast<unsigned>(k));
  const auto pivot = next ? pivot_kernel<kPivotAhead> : pivot_kernel<1>;
  pivot<<<pivot_grid, kThreads, 0, stream>>>(
      sums.const_data_ptr<double>(), grid.x, Cs, C, P, out.m_s.mutable_data_ptr<double>(),
      out.m_d.mutable_data_ptr<double>(), alpha_parts.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto centred = next ? centred_kernel<scalar_t, kCentredAhead> : centred_kernel<scalar_t, 1>;
  centred<<<grid, block, 0, stream>>>(
      out.us.mutable_data_ptr<op_t>(), out.d.mutable_data_ptr<op_t>(), stats.const_data_ptr<double>(),
      out.m_s.const_data_ptr<double>(), out.m_d.const_data_ptr<double>(), Cs, Ct, P, backward,
      beta.mutable_data_ptr<double>(), backward ? out.norms.mutable_data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                  int64_t pool) {
  check_affinity_loss_inputs(student, teacher, pool);
  if (!fused_takes(student, teacher, pool)) return affinity_loss_batched(student, teacher, pool);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_dtype(student.scalar_type());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const PoolView vs = pool_view(student, pool), vt = pool_view(teacher, pool);
  const int64_t P = affinity_pooled_pixels(vs.H, vs.W, pool), tiles = (C + kTile - 1) / kTile;
  const auto opts = student.options().dtype(acc);
  // every chunk writes its images' rows of all four in full: no fills
  at::Tensor gss = at::empty({B, Cs, Cs}, opts), gsd = at::empty({B, Cs, Ct}, opts);
  const auto wide = opts.dtype(at::kDouble);
  at::Tensor beta = at::empty({B, P}, wide), alpha_parts = at::empty({B, alpha_tiles(C)}, wide);
  at::Tensor partials = at::empty({B, tiles * tiles}, wide), loss = at::empty({B}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunk = affinity_chunk_images(pool, B);  // memory: affinity_loss_batched.cpp
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "affinity_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t k = std::min(chunk, B - b0);
      const CentredChunk x = centred_chunk<scalar_t>(student, vs, teacher, vt, b0, k, false, beta.narrow(0, b0, k),
                                                     alpha_parts.narrow(0, b0, k));
      const at::Tensor &us = x.us, &d = x.d;
      at::Tensor g_ss = gss.narrow(0, b0, k);
      gram(us, us.transpose(1, 2), acc, &g_ss);
      const at::Tensor g_sd = gram(us, d.transpose(1, 2), acc);  // [k, Cs, C]
      const at::Tensor g_dd = gram(d, d.transpose(1, 2), acc);   // [k, C, C]
      const dim3 tail_grid(static_cast<unsigned>(tiles * tiles), static_cast<unsigned>(k));
      gram_tail_kernel<acc_t><<<tail_grid, kThreads, 0, stream>>>(
          g_ss.const_data_ptr<acc_t>(), g_sd.const_data_ptr<acc_t>(), g_dd.const_data_ptr<acc_t>(),
          gsd.narrow(0, b0, k).mutable_data_ptr<acc_t>(), Cs, Ct, C, partials.narrow(0, b0, k).mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    affinity_means_kernel<acc_t><<<B, kThreads, 0, stream>>>(
        partials.const_data_ptr<double>(), tiles * tiles, beta.const_data_ptr<double>(),
        alpha_parts.const_data_ptr<double>(), alpha_tiles(C), P, affinity_mean_divisor(P),
        loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, gss, gsd};
}

at::Tensor affinity_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                       const at::Tensor& gss_in, const at::Tensor& gsd_in, int64_t pool) {
  check_affinity_loss_backward_inputs(grad, student, teacher, gss_in, gsd_in, pool);
  const auto acc = acc_dtype(student.scalar_type());
  if (!fused_takes(student, teacher, pool) || gss_in.scalar_type() != acc || gsd_in.scalar_type() != acc)
    return affinity_loss_backward_batched(grad, student, teacher, gss_in, gsd_in, pool);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const PoolView vs = pool_view(student, pool), vt = pool_view(teacher, pool);
  const int64_t P = affinity_pooled_pixels(vs.H, vs.W, pool);
  const at::Tensor g = grad.scalar_type() == acc ? grad : grad.to(acc);  // [B], any stride (an expanded sum's)
  const at::Tensor gss = gss_in.contiguous(), gsd = gsd_in.contiguous();  // the forward's: already so
  // every element is written (the windows tile each plane)
  at::Tensor out = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  const auto wide = student.options().dtype(at::kDouble);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunk = affinity_chunk_images(pool, B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "affinity_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using op_t = gemm_operand_t<scalar_t>;
    const auto op_opts = student.options().dtype(c10::CppTypeToScalarType<op_t>::value);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t k = std::min(chunk, B - b0);
      at::Tensor g_sd = at::empty({k, Cs, Cs}, op_opts), g_st = at::empty({k, Cs, Ct}, op_opts);
      gram_operands_kernel<acc_t, op_t><<<blocks_for(k * Cs * C), kThreads, 0, stream>>>(
          gss.const_data_ptr<acc_t>() + b0 * Cs * Cs, gsd.const_data_ptr<acc_t>() + b0 * Cs * Ct, k, Cs, Ct,
          g_sd.mutable_data_ptr<op_t>(), g_st.mutable_data_ptr<op_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const scalar_t* xs = student.const_data_ptr<scalar_t>() + b0 * vs.s0;
      at::Tensor beta = at::empty({k, P}, wide), alpha_parts = at::empty({k, alpha_tiles(C)}, wide);
      const CentredChunk x = centred_chunk<scalar_t>(student, vs, teacher, vt, b0, k, true, beta, alpha_parts);
      at::Tensor u = at::empty({k, Cs}, wide);
      constexpr int kWarps = kThreads / 32;
      pivot_u_kernel<acc_t><<<dim3(static_cast<unsigned>((Cs + kWarps - 1) / kWarps), static_cast<unsigned>(k)),
                              kThreads, 0, stream>>>(gss.const_data_ptr<acc_t>() + b0 * Cs * Cs,
                                                     gsd.const_data_ptr<acc_t>() + b0 * Cs * Ct,
                                                     x.m_s.const_data_ptr<double>(), x.m_d.const_data_ptr<double>(), Cs,
                                                     Ct, u.mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor g1 = gram(g_sd, x.us, acc), g2 = gram(g_st, x.d.narrow(1, 0, Ct), acc);  // [k, Cs, P] each
      const auto gradient = cuda_next_enabled() ? affinity_gradient_kernel<scalar_t, kGradientAhead>
                                                : affinity_gradient_kernel<scalar_t, 1>;
      gradient<<<pixel_grid(P, k), dim3(kPixels, kGroups), 0, stream>>>(
          g1.const_data_ptr<acc_t>(), g2.const_data_ptr<acc_t>(), x.us.const_data_ptr<op_t>(),
          x.norms.const_data_ptr<double>(), u.const_data_ptr<double>(), x.m_s.const_data_ptr<double>(),
          alpha_parts.const_data_ptr<double>(), alpha_tiles(C), beta.const_data_ptr<double>(),
          g.const_data_ptr<acc_t>() + b0 * g.stride(0), g.stride(0), 4.0 / affinity_mean_divisor(P), xs, vs, Cs, P,
          out.mutable_data_ptr<scalar_t>() + b0 * Cs * vs.H * vs.W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("affinity_loss", &affinity_loss_cuda);
  m.impl("_affinity_loss_backward", &affinity_loss_backward_cuda);
}

}  // namespace idd_ops
