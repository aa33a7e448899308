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
// IDD_OPS_CUDA_NEXT=1 keeps x and d interleaved in one tensor z = [x; d] (each image's Cs rows of
// x, then its C rows of d: OperandRows), so that a GEMM reads both as one operand: forward G_xx
// and [G_xd; G_dd] = z d^T (2 GEMMs), the tail adding each image's mean in its last tile block to
// finish (no means launch); backward [G_xd | G_xy] z[:Cs + Ct] = G_xd x + G_xy d (1 GEMM, one
// [k, Cs, P] result for the gradient kernel to read where two were), its left factor formed with
// u in one launch. At one chunk, 6 + 6 launches where the default takes 8 + 8: on the H200's
// machine each launch cost the host 15-40 us, and SKD at B = 2 waited on the host. There
// _affinity_loss_sum ("mean" and "sum") has the last chunk's tail add the images' means too (the
// default set adds them with ATen); in both sets its backward takes the scale in the gradient
// kernel's factor.
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
// At one chunk that is 8 + 8 launches of the library's kernels and GEMMs (6 + 6 next), where the
// ATen formulation takes several times as many. The reductions run in a fixed order (no float
// atomics; the next set's tickets only count blocks): the same bits on every run.
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
#include "affinity_grams.cuh"
#include "affinity_pivot.cuh"
#include "cuda_utils.cuh"
#include "grid_tickets.cuh"

namespace idd_ops {
namespace {

using namespace affinity_cuda;

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
// pivot_kernel, centred_kernel: three launches. Under IDD_OPS_CUDA_NEXT=1 x and d are views of
// one tensor z [k, Cs + C, P], each image's rows of x followed by its rows of d (OperandRows), so
// that a GEMM takes both as one operand; else two contiguous tensors.
struct CentredChunk {
  at::Tensor us, d, z, m_s, m_d, norms;

  template <typename op_t>
  OperandRows<op_t> rows() const {
    return {us.mutable_data_ptr<op_t>(), d.mutable_data_ptr<op_t>(), us.stride(0), d.stride(0)};
  }
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
  const bool next = cuda_next_enabled(NextGroup::skd);
  CentredChunk out;
  if (next) {
    out.z = at::empty({k, Cs + C, P}, op_opts);
    out.us = out.z.narrow(1, 0, Cs);
    out.d = out.z.narrow(1, Cs, C);
  } else {
    out.us = at::empty({k, Cs, P}, op_opts);
    out.d = at::empty({k, C, P}, op_opts);
  }
  out.m_s = at::empty({k, Cs}, wide);
  out.m_d = at::empty({k, C}, wide);
  if (backward) out.norms = at::empty({k, P}, wide);
  at::Tensor stats = at::empty({k, 3, P}, wide), sums = at::empty({k, static_cast<int64_t>(grid.x), Cs + C}, wide);
  const auto pooled_sums = next ? pooled_sums_kernel<scalar_t, kPooledAhead> : pooled_sums_kernel<scalar_t, 1>;
  pooled_sums<<<grid, block, 0, stream>>>(
      student.const_data_ptr<scalar_t>() + b0 * vs.s0, vs, teacher.const_data_ptr<scalar_t>() + b0 * vt.s0, vt, Cs,
      Ct, P, out.rows<op_t>(), stats.mutable_data_ptr<double>(), sums.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 pivot_grid(static_cast<unsigned>(alpha_tiles(C)), static_cast<unsigned>(k));
  const auto pivot = next ? pivot_kernel<kPivotAhead> : pivot_kernel<1>;
  pivot<<<pivot_grid, kThreads, 0, stream>>>(
      sums.const_data_ptr<double>(), grid.x, Cs, C, P, out.m_s.mutable_data_ptr<double>(),
      out.m_d.mutable_data_ptr<double>(), alpha_parts.mutable_data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto centred = next ? centred_kernel<scalar_t, kCentredAhead> : centred_kernel<scalar_t, 1>;
  centred<<<grid, block, 0, stream>>>(
      out.rows<op_t>(), stats.const_data_ptr<double>(), out.m_s.const_data_ptr<double>(),
      out.m_d.const_data_ptr<double>(), Cs, Ct, P, backward, beta.mutable_data_ptr<double>(),
      backward ? out.norms.mutable_data_ptr<double>() : nullptr);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// _affinity_loss_sum's loss: under IDD_OPS_CUDA_NEXT's "skd" group, fused_forward defines `total`
// (0-dim, the accumulation dtype), its Gram tail adding the means times `scale`; else the caller
// adds them.
struct BatchSum {
  double scale;
  at::Tensor total;
};

// affinity_loss on inputs that fused_takes; and _affinity_loss_sum's loss where `sum` is given.
std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_forward(const at::Tensor& student, const at::Tensor& teacher,
                                                             int64_t pool, BatchSum* sum) {
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_dtype(student.scalar_type());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const PoolView vs = pool_view(student, pool), vt = pool_view(teacher, pool);
  const int64_t P = affinity_pooled_pixels(vs.H, vs.W, pool), tiles = (C + kGramTile - 1) / kGramTile;
  const auto opts = student.options().dtype(acc);
  // every chunk writes its images' rows of all four in full: no fills
  at::Tensor gss = at::empty({B, Cs, Cs}, opts), gsd = at::empty({B, Cs, Ct}, opts);
  const auto wide = opts.dtype(at::kDouble);
  at::Tensor beta = at::empty({B, P}, wide), alpha_parts = at::empty({B, alpha_tiles(C)}, wide);
  at::Tensor partials = at::empty({B, tiles * tiles}, wide), loss = at::empty({B}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunk = affinity_chunk_images(pool, B);  // memory: affinity_loss_batched.cpp
  const bool next = cuda_next_enabled(NextGroup::skd);
  // next: each image's mean by its last tile block to finish (gram_tail_means_kernel), and the
  // batch's total by the last chunk's last image (one counter more)
  const int64_t images = std::min(chunk, B);
  const at::Tensor counters = next ? grid_ticket_counters(student.device(), images + 1) : at::Tensor();
  if (sum != nullptr && next) sum->total = at::empty({}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "affinity_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t k = std::min(chunk, B - b0);
      const CentredChunk x = centred_chunk<scalar_t>(student, vs, teacher, vt, b0, k, false, beta.narrow(0, b0, k),
                                                     alpha_parts.narrow(0, b0, k));
      const at::Tensor &us = x.us, &d = x.d;
      at::Tensor g_ss = gss.narrow(0, b0, k);
      gram(us, us.transpose(1, 2), acc, &g_ss);
      const dim3 tail_grid(static_cast<unsigned>(tiles * tiles), static_cast<unsigned>(k));
      acc_t* kept = gsd.narrow(0, b0, k).mutable_data_ptr<acc_t>();
      double* tile_sums = partials.narrow(0, b0, k).mutable_data_ptr<double>();
      if (next) {  // G_xd over G_dd from one GEMM, [x; d] d^T: [k, Cs + C, C]
        const at::Tensor grams = gram(x.z, d.transpose(1, 2), acc);
        const TailMeans<acc_t> means{grams.const_data_ptr<acc_t>(),
                                     tile_sums,
                                     beta.narrow(0, b0, k).const_data_ptr<double>(),
                                     alpha_parts.narrow(0, b0, k).const_data_ptr<double>(),
                                     alpha_tiles(C),
                                     P,
                                     affinity_mean_divisor(P),
                                     loss.narrow(0, b0, k).mutable_data_ptr<acc_t>(),
                                     reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int32_t>()),
                                     {loss.const_data_ptr<acc_t>(), B, sum ? sum->scale : 0.0,
                                      sum && b0 + k == B ? sum->total.mutable_data_ptr<acc_t>() : nullptr,
                                      reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int32_t>()) + images}};
        gram_tail_means_kernel<acc_t>
            <<<tail_grid, kThreads, 0, stream>>>(g_ss.const_data_ptr<acc_t>(), kept, Cs, Ct, C, means);
      } else {
        const at::Tensor g_sd = gram(us, d.transpose(1, 2), acc);  // [k, Cs, C]
        const at::Tensor g_dd = gram(d, d.transpose(1, 2), acc);   // [k, C, C]
        gram_tail_kernel<acc_t><<<tail_grid, kThreads, 0, stream>>>(g_ss.const_data_ptr<acc_t>(),
                                                                     g_sd.const_data_ptr<acc_t>(),
                                                                     g_dd.const_data_ptr<acc_t>(), kept, Cs, Ct, C,
                                                                     tile_sums);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    if (!next) {
      affinity_means_kernel<acc_t><<<B, kThreads, 0, stream>>>(
          partials.const_data_ptr<double>(), tiles * tiles, beta.const_data_ptr<double>(),
          alpha_parts.const_data_ptr<double>(), alpha_tiles(C), P, affinity_mean_divisor(P),
          loss.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {loss, gss, gsd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                  int64_t pool) {
  check_affinity_loss_inputs(student, teacher, pool);
  if (!fused_takes(student, teacher, pool)) return affinity_loss_batched(student, teacher, pool);
  return fused_forward(student, teacher, pool, nullptr);
}

// The forward's launches and the total in the Gram tail's last block under IDD_OPS_CUDA_NEXT=1
// (no ATen sum and scaling after them); the default set adds the means with ATen.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_sum_cuda(const at::Tensor& student,
                                                                      const at::Tensor& teacher, int64_t pool,
                                                                      bool mean) {
  check_affinity_loss_inputs(student, teacher, pool);
  const int64_t P = affinity_pooled_pixels(student.size(2), student.size(3), pool);
  BatchSum sum{affinity_sum_scale(student.size(0), P, mean), at::Tensor()};
  auto [means, gss, gsd] = fused_takes(student, teacher, pool) ? fused_forward(student, teacher, pool, &sum)
                                                                : affinity_loss_batched(student, teacher, pool);
  return {sum.total.defined() ? sum.total : affinity_loss_total(means, sum.scale), gss, gsd};
}

// Whether the fused backward takes these inputs: fused_takes', and the Grams in the accumulation
// dtype (the forward's).
bool fused_backward_takes(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& gss,
                          const at::Tensor& gsd, int64_t pool) {
  const auto acc = acc_dtype(student.scalar_type());
  return fused_takes(student, teacher, pool) && gss.scalar_type() == acc && gsd.scalar_type() == acc;
}

// affinity_loss's backward on inputs that fused_backward_takes, from the per-image gradients
// grad [B] (any stride: a sum's is expanded) times `scale`.
at::Tensor fused_backward(const at::Tensor& grad, double scale, const at::Tensor& student, const at::Tensor& teacher,
                          const at::Tensor& gss_in, const at::Tensor& gsd_in, int64_t pool) {
  const auto acc = acc_dtype(student.scalar_type());
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const PoolView vs = pool_view(student, pool), vt = pool_view(teacher, pool);
  const int64_t P = affinity_pooled_pixels(vs.H, vs.W, pool);
  const at::Tensor g = grad.scalar_type() == acc ? grad : grad.to(acc);
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
    const bool next = cuda_next_enabled(NextGroup::skd);
    constexpr int kWarps = kThreads / 32;
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t k = std::min(chunk, B - b0);
      const acc_t* gss_k = gss.const_data_ptr<acc_t>() + b0 * Cs * Cs;
      const acc_t* gsd_k = gsd.const_data_ptr<acc_t>() + b0 * Cs * Ct;
      const dim3 row_grid(static_cast<unsigned>((Cs + kWarps - 1) / kWarps), static_cast<unsigned>(k));
      at::Tensor g_sd, g_st;
      if (!next) {  // next: with u below
        g_sd = at::empty({k, Cs, Cs}, op_opts);
        g_st = at::empty({k, Cs, Ct}, op_opts);
        gram_operands_kernel<acc_t, op_t><<<blocks_for(k * Cs * C), kThreads, 0, stream>>>(
            gss_k, gsd_k, k, Cs, Ct, g_sd.mutable_data_ptr<op_t>(), g_st.mutable_data_ptr<op_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      const scalar_t* xs = student.const_data_ptr<scalar_t>() + b0 * vs.s0;
      at::Tensor beta = at::empty({k, P}, wide), alpha_parts = at::empty({k, alpha_tiles(C)}, wide);
      const CentredChunk x = centred_chunk<scalar_t>(student, vs, teacher, vt, b0, k, true, beta, alpha_parts);
      at::Tensor u = at::empty({k, Cs}, wide), g1, g2;
      if (next) {  // [g_sd | g_st] [x; d[:Ct]] = G_xd x + G_xy d in one GEMM: [k, Cs, P]
        const at::Tensor a = at::empty({k, Cs, Cs + Ct}, op_opts);
        operands_u_kernel<acc_t, op_t><<<row_grid, kThreads, 0, stream>>>(
            gss_k, gsd_k, x.m_s.const_data_ptr<double>(), x.m_d.const_data_ptr<double>(), Cs, Ct,
            a.mutable_data_ptr<op_t>(), u.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        g1 = gram(a, x.z.narrow(1, 0, Cs + Ct), acc);
      } else {
        pivot_u_kernel<acc_t><<<row_grid, kThreads, 0, stream>>>(gss_k, gsd_k, x.m_s.const_data_ptr<double>(),
                                                                 x.m_d.const_data_ptr<double>(), Cs, Ct,
                                                                 u.mutable_data_ptr<double>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        g1 = gram(g_sd, x.us, acc);
        g2 = gram(g_st, x.d.narrow(1, 0, Ct), acc);  // [k, Cs, P] each
      }
      const auto gradient = next ? affinity_gradient_kernel<scalar_t, kGradientAhead>
                                 : affinity_gradient_kernel<scalar_t, 1>;
      gradient<<<pixel_grid(P, k), dim3(kPixels, kGroups), 0, stream>>>(
          g1.const_data_ptr<acc_t>(), next ? nullptr : g2.const_data_ptr<acc_t>(), x.us.const_data_ptr<op_t>(),
          x.us.stride(0), x.norms.const_data_ptr<double>(), u.const_data_ptr<double>(),
          x.m_s.const_data_ptr<double>(), alpha_parts.const_data_ptr<double>(), alpha_tiles(C),
          beta.const_data_ptr<double>(), g.const_data_ptr<acc_t>() + b0 * g.stride(0), g.stride(0),
          4.0 * scale / affinity_mean_divisor(P), xs, vs, Cs, P,
          out.mutable_data_ptr<scalar_t>() + b0 * Cs * vs.H * vs.W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

at::Tensor affinity_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                       const at::Tensor& gss, const at::Tensor& gsd, int64_t pool) {
  check_affinity_loss_backward_inputs(grad, student, teacher, gss, gsd, pool);
  if (!fused_backward_takes(student, teacher, gss, gsd, pool))
    return affinity_loss_backward_batched(grad, student, teacher, gss, gsd, pool);
  return fused_backward(grad, 1.0, student, teacher, gss, gsd, pool);
}

// The loss's one gradient read by every image's gradient pass (a stride-0 view), the scale in
// the kernel's factor: no launch before them where the gradient is in the accumulation dtype (as
// the op's own loss is).
at::Tensor affinity_loss_sum_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                           const at::Tensor& gss, const at::Tensor& gsd, int64_t pool, bool mean) {
  check_affinity_loss_backward_inputs(grad, student, teacher, gss, gsd, pool, /*reduced=*/true);
  const int64_t B = student.size(0), P = affinity_pooled_pixels(student.size(2), student.size(3), pool);
  const double scale = affinity_sum_scale(B, P, mean);
  if (!fused_backward_takes(student, teacher, gss, gsd, pool))
    return affinity_loss_backward_batched(affinity_sum_grad(grad, scale, B, gss.scalar_type()), student, teacher,
                                          gss, gsd, pool);
  return fused_backward(grad.reshape({}).expand({B}), scale, student, teacher, gss, gsd, pool);
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("affinity_loss", &affinity_loss_cuda);
  m.impl("_affinity_loss_backward", &affinity_loss_backward_cuda);
  m.impl("_affinity_loss_sum", &affinity_loss_sum_cuda);
  m.impl("_affinity_loss_sum_backward", &affinity_loss_sum_backward_cuda);
}

}  // namespace idd_ops
