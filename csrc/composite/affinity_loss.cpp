// Structural (pairwise-affinity) KD loss through C x C Gram products, forward and backward,
// with the pooling and the L2 normalisation fused in, written from ATen calls and GEMMs
// (CompositeExplicitAutograd), so the P x P affinity is never formed. Two formulations
// (affinity_loss.h): this file's blocked one, tuned for the CPU, and the batched one
// (affinity_loss_batched.cpp), CUDA's.
//
// With F_S [Cs, P] and F_T [Ct, P] the pooled, L2-normalised (over channels) features of one
// image and A = F^T F:
//   sum (A_S - A_T)^2 = ||F_S F_S^T||^2 - 2 ||F_S F_T^T||^2 + ||F_T F_T^T||^2   (Frobenius)
//   d/dF_S = 4 (F_S F_S^T F_S - F_S F_T^T F_T)
// both computed in differenced forms (affinity_loss.h) that keep their accuracy as the two
// affinities near each other.
// The Grams are of the features centred on each image's mean directions (affinity_pivot), so
// that a common offset does not round them. Per image the features are pooled once, in their
// dtype (one image's worth: pool 1 takes the image itself); a first pass over blocks of pooled
// pixels (block_pixels: 512 on the CPU) sums S and T for the means and keeps each pixel's norm,
// and a second normalises, differences and centres each block in float64 and accumulates the
// Grams. On the CPU the float64 copies exist one block at a time (O(C kBlockPixels)), never for
// the whole image or batch, and the backward forms them again per block from the pooled image and routes the
// gradient straight into the input-sized result. Extra memory beyond that result: the two
// [B, Cs, C] Grams kept for the backward, one pooled image of each network (with its int64
// argmax in the backward) and a few [C, C] and block-sized temporaries. Measured on 2 CPU cores
// (benchmarks.report, B = 8, 512 channels, 64 x 128, forward+backward, the two builds in turn,
// twice): about as fast as the uncentred form that pooled each block (pool 2: 369-378 against
// 359-402 ms; pool 1: 892-902 against 872-883), where the same passes with per-block pooling
// and at::norm took 586 and 1401; peak memory 170 against 159 MiB at pool 2.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/checks.h"
#include "../common/cuda_next.h"
#include "affinity_loss.h"

namespace idd_ops {
namespace {

// Pooled pixels per block: each Gram update reads and writes a C x C accumulator, so a block
// needs a few hundred pixels to amortise it over the products (at 128 pixels, 2048-channel
// updates cost more than the products), while its float64 copies stay at C x 512 values (4 MiB
// at 1024 channels).
constexpr int64_t kBlockPixels = 512;

// Pooled pixels per block on the features' device: kBlockPixels on the CPU; the whole image
// elsewhere, where every ATen call is a launch (this formulation is CUDA's default) and a block's
// cache footprint buys nothing: a pass is then a fixed number of launches per image, however
// large. ATen calls of a forward+backward at B = 8, pool 2 (tests/cuda_emu/report.py's count):
// 1308 with one block an image, where 512-pixel blocks take 3588 at 64 x 128 (P = 2048) and the
// uncentred form with its per-block pooling took 1681 there (577 at one block an image).
int64_t block_pixels(const at::Tensor& x, int64_t pooled_pixels) {
  return x.is_cpu() ? kBlockPixels : std::max<int64_t>(pooled_pixels, 1);
}

// pool x pool max (ceil mode) of one image [C, H, W] -> [C, ceil(H / pool) * ceil(W / pool)]
// through strided maxima: ATen's CPU max pooling ran about 7x slower on few-row blocks, and a
// forward with it on whole images took 266 against 143 ms (B = 8, 512 channels, 64 x 128).
// Values only; the backward's argmax comes from ATen.
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

// One image's pooled features [C, P] in its dtype (pool 1: the image itself), pooled once for
// both passes over its blocks, and where asked (the backward, pool > 1) each window's argmax
// [C, P], flat in H x W. At most an input image's size: the blocks' float64 copies are what
// would not fit in cache.
struct PooledImage {
  at::Tensor values, indices;
};

PooledImage pooled_image(const at::Tensor& x, int64_t pool, bool with_indices) {
  PooledImage out;
  if (pool == 1) {
    out.values = x.reshape({x.size(0), -1});
    return out;
  }
  if (with_indices) {
    // [1, C, H, W]: ATen's CPU max pooling runs a batch of one image about 1.7x faster than the
    // same image without a batch dimension
    auto [v, i] = at::max_pool2d_with_indices(x.unsqueeze(0), {pool, pool}, {pool, pool}, {0, 0}, {1, 1}, true);
    out.values = v.flatten(2)[0];
    out.indices = i.flatten(2)[0];
  } else {
    out.values = max_pool_values(x, pool);
  }
  return out;
}

// Pixels [p0, p0 + n) of a pooled image [C, P], normalised over channels in float64 by their
// norms [1, P] (image_pivot's): u [C, n] and the norms [1, n].
struct NormalisedBlock {
  at::Tensor u, norm;
};

NormalisedBlock normalised_block(const at::Tensor& pooled, const at::Tensor& norms, int64_t p0, int64_t n) {
  at::Tensor norm = norms.narrow(1, p0, n);
  // a copy whatever the dtype: the caller centres it in place, and the pooled image is reused
  at::Tensor u = pooled.narrow(1, p0, n).to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
  return {u.div_(norm.clamp_min(kAffinityNormEps)), norm};
}

// D = S - T [rows, p], float64, of one block's float64 normalised features us [Cs, p] and
// ut [Ct, p], each padded with zero rows up to rows = C = max(Cs, Ct): every row is a difference
// or one network's alone (no fill).
at::Tensor difference_rows(const at::Tensor& us, const at::Tensor& ut, int64_t rows) {
  const int64_t cs = std::min(us.size(0), rows), ct = std::min(ut.size(0), rows), shared = std::min(cs, ct);
  at::Tensor d = at::empty({rows, us.size(1)}, us.options());
  at::Tensor both = d.narrow(0, 0, shared), one = d.narrow(0, shared, rows - shared);
  at::sub_out(both, us.narrow(0, 0, shared), ut.narrow(0, 0, shared));
  if (cs > shared) one.copy_(us.narrow(0, shared, cs - shared));
  if (ct > shared) at::neg_out(one, ut.narrow(0, shared, ct - shared));
  return d;
}

// One image's pivot (affinity_pivot) and its pixels' norms [1, P] (float64) for both networks,
// from the pooled features [Cs, P] and [Ct, P]: a pass over the image's blocks, before the pass
// that forms the Grams. Each block's sum of S is a product with the reciprocal norms (no
// normalised copy), and D's sum is S's less T's: its absolute rounding, 1e-16 of the features'
// size, shifts every d_i alike, which the centred terms carry at that size. The norms are sums of
// squares over channels, not at::norm: along dim 0 of [C, n] ATen's norm ran 2.5x slower than a
// product and a column sum (300 against 120 us at 512 x 512 float64), the blocks' largest cost.
struct ImagePivot {
  AffinityPivot pivot;
  at::Tensor norms_s, norms_t;
};

ImagePivot image_pivot(const at::Tensor& ps, const at::Tensor& pt, int64_t C) {
  const int64_t P = ps.size(1), block = block_pixels(ps, P);
  const auto sums_and_norms = [&](const at::Tensor& pooled) {
    at::Tensor sum = at::zeros({C}, pooled.options().dtype(at::kDouble)), norms = sum.new_empty({1, P});
    for (int64_t p0 = 0; p0 < P; p0 += block) {
      const int64_t n = std::min(block, P - p0);
      const at::Tensor y = pooled.narrow(1, p0, n).to(at::kDouble);
      at::Tensor norm = norms.narrow(1, p0, n);
      at::sum_out(norm, y * y, {0}, /*keepdim=*/true).sqrt_();
      sum.narrow(0, 0, pooled.size(0)).add_(at::mv(y, norm[0].clamp_min(kAffinityNormEps).reciprocal_()));
    }
    return std::make_pair(sum, norms);
  };
  const auto [sum_s, norms_s] = sums_and_norms(ps);
  const auto [sum_t, norms_t] = sums_and_norms(pt);
  return {affinity_pivot(sum_s.narrow(0, 0, ps.size(0)), sum_s - sum_t, P), norms_s, norms_t};
}

// Returns (per-image loss [B], G_xx, G_xd's first Ct columns): entry b is the mean over the P*P
// affinity entries of image b, in the accumulation dtype; the two Grams are what the backward
// needs (affinity_saved_gram).
// The differenced form (affinity_loss.h) over the features centred on the image's pivot,
// accumulated over blocks: the products computed are G_xx [Cs, Cs], G_xd [Cs, C] and G_dd [C, C],
// P (Cs^2 + Cs C + C^2) multiply-adds.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_blocked(const at::Tensor& student,
                                                                     const at::Tensor& teacher, int64_t pool) {
  check_affinity_loss_inputs(student, teacher, pool);
  const auto acc = acc_dtype(student.scalar_type());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1);
  const int64_t C = std::max(Cs, Ct), P = affinity_pooled_pixels(student.size(2), student.size(3), pool);
  const auto opts = student.options().dtype(acc);
  at::Tensor gss = at::zeros({B, Cs, Cs}, opts), gsd = at::zeros({B, Cs, Ct}, opts);
  at::Tensor sums = at::zeros({B}, opts.dtype(at::kDouble));
  if (P == 0) return {affinity_means(sums, P, acc), gss, gsd};
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor ps = pooled_image(student[b], pool, false).values;
    const at::Tensor pt = pooled_image(teacher[b], pool, false).values;
    const ImagePivot image = image_pivot(ps, pt, C);
    const AffinityPivot& pivot = image.pivot;
    at::Tensor g_ss = gss[b];
    at::Tensor g_sd = at::zeros({Cs, C}, opts), g_dd = at::zeros({C, C}, opts), beta_sq = sums.new_zeros({});
    for (int64_t p0 = 0, block = block_pixels(student, P); p0 < P; p0 += block) {
      const int64_t n = std::min(block, P - p0);
      // normalised, differenced and centred in float64 before rounding: D keeps its relative
      // accuracy even where it is far smaller than the features (rounding them first cost 4e-4
      // of the value), x and d theirs however large the offset they share
      at::Tensor us = normalised_block(ps, image.norms_s, p0, n).u;
      at::Tensor d64 = difference_rows(us, normalised_block(pt, image.norms_t, p0, n).u, C);
      beta_sq.add_(centre_on_pivot(us, d64, pivot).square().sum());
      const at::Tensor x = us.to(acc), d = d64.to(acc);
      g_ss.addmm_(x, x.t());
      g_sd.addmm_(x, d.t());
      g_dd.addmm_(d, d.t());
    }
    sums[b].copy_(differenced_affinity_sum(g_ss, g_sd, g_dd) + pivot_affinity_sum(pivot, beta_sq));
    gsd[b].copy_(affinity_saved_gram(g_sd, Ct));
  }
  return {affinity_means(sums, P, acc), gss, gsd};
}

// grad [B] (one value per image's loss) -> d/d student [B, Cs, H, W]: per image its pivot again,
// then per block the gradient w.r.t. the normalised features 4 s_b (m_S r_i + u + G_xd x_i +
// G_xy d_i) (affinity_input_gradient, affinity_saved_gram; x and d centred in float64 as in the
// forward) through the normalisation, into each window's argmax.
at::Tensor affinity_loss_backward_blocked(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& gss, const at::Tensor& gsd, int64_t pool) {
  check_affinity_loss_backward_inputs(grad, student, teacher, gss, gsd, pool);
  const auto acc = gss.scalar_type();
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), H = student.size(2), W = student.size(3);
  const int64_t C = std::max(Cs, Ct), P = affinity_pooled_pixels(student.size(2), student.size(3), pool);
  const at::Tensor scale = grad.to(acc) * (4.0 / affinity_mean_divisor(P));
  at::Tensor out = at::zeros({B, Cs, H, W}, student.options().memory_format(at::MemoryFormat::Contiguous));
  if (P == 0) return out;
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor out_b = out[b].view({Cs, H * W});
    const PooledImage ps = pooled_image(student[b], pool, true);
    const at::Tensor pt = pooled_image(teacher[b], pool, false).values;
    const ImagePivot image = image_pivot(ps.values, pt, C);
    const AffinityPivot& pivot = image.pivot;
    const at::Tensor gsd_b = gsd[b].to(acc);
    const auto [g_sd, g_st] = affinity_gram_operands(gss[b], gsd_b);
    const at::Tensor u = pivot_u(gss[b], gsd_b, pivot);
    for (int64_t p0 = 0, block = block_pixels(student, P); p0 < P; p0 += block) {
      const int64_t n = std::min(block, P - p0);
      NormalisedBlock s = normalised_block(ps.values, image.norms_s, p0, n);
      at::Tensor d64 = difference_rows(s.u, normalised_block(pt, image.norms_t, p0, n).u, C);
      const at::Tensor gy =
          pooled_student_gradient(s.u, d64, s.norm, pivot, g_sd, g_st, u, scale[b], acc).to(student.scalar_type());
      if (pool == 1) {
        out_b.narrow(1, p0, n).copy_(gy);
      } else {
        out_b.scatter_(1, ps.indices.narrow(1, p0, n), gy);
      }
    }
  }
  return out;
}

// The batched formulation on CUDA tensors where the extension has no CUDA kernels (with them,
// affinity_loss_cuda.cu runs it with fused kernels), and wherever the private variable
// _IDD_OPS_SKD_BATCHED=1 forces it (read per call: the CPU tests use it to test the GPU's
// formulation).
bool use_batched(const at::Tensor& student) {
  return student.is_cuda() || env_flag("_IDD_OPS_SKD_BATCHED");
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
