// Structural (pairwise-affinity) KD loss through C x C Gram products, forward and backward,
// with the pooling and the L2 normalisation fused in, written from ATen calls and GEMMs
// (CompositeExplicitAutograd), so the P x P affinity is never formed. Two formulations
// (affinity_loss.h): this file's blocked one, tuned for the CPU, and the batched one
// (affinity_loss_batched.cpp) that CUDA takes under IDD_OPS_CUDA_NEXT=1.
//
// With F_S [Cs, P] and F_T [Ct, P] the pooled, L2-normalised (over channels) features of one
// image and A = F^T F:
//   sum (A_S - A_T)^2 = ||F_S F_S^T||^2 - 2 ||F_S F_T^T||^2 + ||F_T F_T^T||^2   (Frobenius)
//   d/dF_S = 4 (F_S F_S^T F_S - F_S F_T^T F_T)
// both computed in differenced forms (affinity_loss.h) that keep their accuracy as the two
// affinities near each other.
// The Grams are sums over pixels, so they are accumulated over blocks of pooled pixels
// (kBlockPixels): the pooled and normalised copies exist one block at a time (O(C kBlockPixels)),
// never for the whole batch, and the backward recomputes them per block from the inputs and
// routes the gradient straight into the input-sized result. Extra memory beyond that result:
// the two [B, Cs, C] Grams kept for the backward and a few [C, C] and block-sized temporaries.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/checks.h"
#include "../common/cuda_next.h"
#include "affinity_loss.h"

namespace idd_ops {
namespace {

// Pooled pixels per block (rounded to whole pooled rows): each Gram update reads and writes a
// C x C accumulator, so a block needs a few hundred pixels to amortise it over the products
// (at 128 pixels, 2048-channel updates cost more than the products), while its copies stay at
// C x 512 values (4 MiB in float64 at 1024 channels).
constexpr int64_t kBlockPixels = 512;

// The pooled map of one image and its blocks of pooled rows.
struct PoolGeometry {
  int64_t H, W, pool, Ho, Wo, rows_per_block;
  PoolGeometry(int64_t height, int64_t width, int64_t p)
      : H(height), W(width), pool(p), Ho((height + p - 1) / p), Wo((width + p - 1) / p),
        rows_per_block(std::max<int64_t>(1, kBlockPixels / std::max<int64_t>(Wo, 1))) {}
  int64_t pixels() const { return Ho * Wo; }
  // input rows [in0, in1) of the pooled rows [o0, o0 + rows_per_block)
  int64_t in0(int64_t o0) const { return o0 * pool; }
  int64_t in1(int64_t o0) const { return std::min(H, (o0 + rows_per_block) * pool); }
};

// One block of one image's pooled (pool x pool max, ceil mode), normalised features.
struct PooledBlock {
  at::Tensor u;        // [C, p] normalised features in `dtype`
  at::Tensor norm;     // [1, p] their norms before normalisation
  at::Tensor indices;  // [C, p] argmax of each window, flat in the block's input rows (pool > 1)
};

// pool x pool max (ceil mode) of rows [C, r, W] -> [C, ceil(r / pool) * ceil(W / pool)] through
// strided maxima: ATen's CPU max pooling ran about 7x slower on these few-row blocks. Values
// only; the backward's argmax comes from ATen.
at::Tensor max_pool_values(const at::Tensor& rows, int64_t pool) {
  const int64_t C = rows.size(0), r = rows.size(1), W = rows.size(2);
  const int64_t ro = (r + pool - 1) / pool, wo = (W + pool - 1) / pool;
  at::Tensor x = rows;
  if (ro * pool != r || wo * pool != W)  // whole windows; in ceil mode each keeps a real value
    x = at::constant_pad_nd(rows, {0, wo * pool - W, 0, ro * pool - r}, -std::numeric_limits<double>::infinity());
  at::Tensor m = x.slice(1, 0, ro * pool, pool);
  for (int64_t i = 1; i < pool; ++i) m = at::maximum(m, x.slice(1, i, ro * pool, pool));
  return m.reshape({C, ro, wo, pool}).amax(3).reshape({C, ro * wo});
}

PooledBlock pooled_block(const at::Tensor& x, const PoolGeometry& g, int64_t o0, at::ScalarType dtype,
                         bool with_indices) {
  // [1, C, rows, W]: ATen's CPU max pooling runs a batch of one image about 1.7x faster than
  // the same image without a batch dimension
  const at::Tensor rows = x.narrow(1, g.in0(o0), g.in1(o0) - g.in0(o0)).unsqueeze(0);
  PooledBlock out;
  at::Tensor y;
  if (g.pool == 1) {
    y = rows.reshape({x.size(0), -1});
  } else if (with_indices) {
    auto [v, i] = at::max_pool2d_with_indices(rows, {g.pool, g.pool}, {g.pool, g.pool}, {0, 0}, {1, 1}, true);
    y = v.flatten(2)[0];
    out.indices = i.flatten(2)[0];
  } else {
    y = max_pool_values(rows[0], g.pool);
  }
  y = y.to(dtype);
  out.norm = y.norm(2, {0}, /*keepdim=*/true);
  out.u = y / out.norm.clamp_min(kAffinityNormEps);
  return out;
}

double mean_divisor(const PoolGeometry& g) { return affinity_mean_divisor(g.pixels()); }

// D = S - T [rows, p], in `dtype`, of one block's float64 normalised features us [Cs, p] and
// ut [Ct, p], each padded with zero rows: rows = C = max(Cs, Ct) in the forward, the teacher's Ct
// in the backward, so every row is a difference or one network's alone (no fill).
at::Tensor difference_rows(const at::Tensor& us, const at::Tensor& ut, int64_t rows, at::ScalarType dtype) {
  const int64_t cs = std::min(us.size(0), rows), ct = std::min(ut.size(0), rows), shared = std::min(cs, ct);
  at::Tensor d = at::empty({rows, us.size(1)}, us.options());
  at::Tensor both = d.narrow(0, 0, shared), one = d.narrow(0, shared, rows - shared);
  at::sub_out(both, us.narrow(0, 0, shared), ut.narrow(0, 0, shared));
  if (cs > shared) one.copy_(us.narrow(0, shared, cs - shared));
  if (ct > shared) at::neg_out(one, ut.narrow(0, shared, ct - shared));
  return d.to(dtype);
}

// Returns (per-image loss [B], G_ss, G_sd's first Ct columns): entry b is the mean over the P*P
// affinity entries of image b, in the accumulation dtype; the two Grams are what the backward
// needs (affinity_saved_gram).
// The differenced form (affinity_loss.h), accumulated over blocks: the products computed are
// G_ss [Cs, Cs], G_sd [Cs, C] and G_dd [C, C], P (Cs^2 + Cs C + C^2) multiply-adds.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_blocked(const at::Tensor& student,
                                                                     const at::Tensor& teacher, int64_t pool) {
  check_affinity_loss_inputs(student, teacher, pool);
  const auto acc = acc_dtype(student.scalar_type());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1);
  const int64_t C = std::max(Cs, Ct);
  const auto opts = student.options().dtype(acc);
  const PoolGeometry g(student.size(2), student.size(3), pool);
  at::Tensor gss = at::empty({B, Cs, Cs}, opts), gsd = at::empty({B, Cs, Ct}, opts), sums = at::empty({B}, opts.dtype(at::kDouble));
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor g_ss = gss[b].zero_();
    at::Tensor g_sd = at::zeros({Cs, C}, opts), g_dd = at::zeros({C, C}, opts);
    for (int64_t o0 = 0; o0 < g.Ho; o0 += g.rows_per_block) {
      // normalised in float64 and differenced before rounding: D keeps its relative accuracy
      // even where it is far smaller than the features (rounding them first cost 4e-4 of the value)
      const at::Tensor us64 = pooled_block(student[b], g, o0, at::kDouble, false).u;
      const at::Tensor ut64 = pooled_block(teacher[b], g, o0, at::kDouble, false).u;
      const at::Tensor us = us64.to(acc), d = difference_rows(us64, ut64, C, acc);
      g_ss.addmm_(us, us.t());
      g_sd.addmm_(us, d.t());
      g_dd.addmm_(d, d.t());
    }
    sums[b].copy_(differenced_affinity_sum(g_ss, g_sd, g_dd));
    gsd[b].copy_(affinity_saved_gram(g_sd, Ct));
  }
  return {affinity_means(sums, g.pixels(), acc), gss, gsd};
}

// grad [B] (one value per image's loss) -> d/d student [B, Cs, H, W]: per block, the gradient
// w.r.t. the normalised features 4 s_b (G_sd F_S + G_st D) (affinity_saved_gram; D differenced
// in float64 as in the forward), through the normalisation ((g - u <u, g>) / |f|, or g / eps
// where the norm is floored), into each window's argmax.
at::Tensor affinity_loss_backward_blocked(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& gss, const at::Tensor& gsd, int64_t pool) {
  check_affinity_loss_backward_inputs(grad, student, teacher, gss, gsd, pool);
  const auto acc = gss.scalar_type();
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), H = student.size(2), W = student.size(3);
  const PoolGeometry g(H, W, pool);
  const at::Tensor scale = grad.to(acc) * (4.0 / mean_divisor(g));
  at::Tensor out = at::zeros({B, Cs, H, W}, student.options().memory_format(at::MemoryFormat::Contiguous));
  if (g.pixels() == 0) return out;  // an empty map (W = 0 leaves Ho > 0 blocks, which ATen's pooling rejects)
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor out_b = out[b].view({Cs, H * W});
    const auto [g_sd, g_st] = affinity_gram_operands(gss[b], gsd[b].to(acc));
    for (int64_t o0 = 0; o0 < g.Ho; o0 += g.rows_per_block) {
      const PooledBlock s = pooled_block(student[b], g, o0, at::kDouble, true);
      const at::Tensor ut64 = pooled_block(teacher[b], g, o0, at::kDouble, false).u;
      const at::Tensor us = s.u.to(acc), norm = s.norm.to(acc);
      at::Tensor gu = at::mm(g_sd, us);
      gu.addmm_(g_st, difference_rows(s.u, ut64, Ct, acc)).mul_(scale[b]);
      const at::Tensor gy = at::where(norm > kAffinityNormEps,
                                      (gu - us * (us * gu).sum(0, /*keepdim=*/true)) / norm, gu / kAffinityNormEps)
                                .to(student.scalar_type());
      const int64_t first = g.in0(o0) * W;
      if (pool == 1) {
        out_b.narrow(1, first, gy.size(1)).copy_(gy);
      } else {
        out_b.scatter_(1, s.indices + first, gy);
      }
    }
  }
  return out;
}

// The batched formulation wherever the private variable _IDD_OPS_SKD_BATCHED=1 forces it (read
// per call: the CPU tests use it to test the GPU's formulation), and on CUDA under
// IDD_OPS_CUDA_NEXT=1 where the extension has no CUDA kernels (with them, affinity_loss_cuda.cu
// runs it with fused kernels).
bool use_batched(const at::Tensor& student) {
  return env_flag("_IDD_OPS_SKD_BATCHED") || (student.is_cuda() && cuda_next_enabled());
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_composite(const at::Tensor& student,
                                                                       const at::Tensor& teacher, int64_t pool) {
  return use_batched(student) ? affinity_loss_batched(student, teacher, pool)
                              : affinity_loss_blocked(student, teacher, pool);
}

at::Tensor affinity_loss_backward_composite(const at::Tensor& grad, const at::Tensor& student,
                                            const at::Tensor& teacher, const at::Tensor& gss, const at::Tensor& gsd,
                                            int64_t pool) {
  return use_batched(student) ? affinity_loss_backward_batched(grad, student, teacher, gss, gsd, pool)
                              : affinity_loss_backward_blocked(grad, student, teacher, gss, gsd, pool);
}

// Every device: both formulations are built from ATen calls and GEMMs (CUDA registers its own
// kernels in affinity_loss_cuda.cu, which call these by default).
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("affinity_loss", &affinity_loss_composite);
  m.impl("_affinity_loss_backward", &affinity_loss_backward_composite);
}

}  // namespace idd_ops
