// SKD's batched formulation (affinity_loss.h): the GPU's. A chunk of whole images is pooled,
// normalised and differenced at once and its Grams are three batched GEMMs, so a forward and
// backward are a few dozen launches per chunk, where the blocked CPU formulation's per-block
// loops cost hundreds on a GPU.
//
// Memory: a chunk holds pool * pool images, so its pooled features [k, C, P] hold about as many
// values as one input image [C, H, W]. Peak temporaries beyond inputs and outputs: about 4 such
// chunk tensors in float64 in the forward (both pooled maps, D, and S + T while their per-pixel
// dot product is summed) and their copies in the accumulation dtype for the GEMMs, about 8 in the
// backward (pooled map and its int64 argmax, both normalised maps, S again for the projection,
// the gradient, one product), plus [k, C, C] Grams.
#include <ATen/ATen.h>

#include <algorithm>

#include "../common/checks.h"
#include "affinity_loss.h"

namespace idd_ops {
namespace {

// [k, C, H, W] -> pool x pool max (ceil mode), [k, C, P] in `acc`.
at::Tensor pooled(const at::Tensor& x, int64_t pool, at::ScalarType acc) {
  const at::Tensor y = pool == 1 ? x : at::max_pool2d(x, {pool, pool}, {pool, pool}, {0, 0}, {1, 1}, true);
  return y.flatten(2).to(acc);
}

// Norms over channels [k, 1, P].
at::Tensor channel_norms(const at::Tensor& x) { return at::linalg_vector_norm(x, 2, {1}, /*keepdim=*/true); }

// x [k, c, P] with zero rows appended up to `rows`.
at::Tensor pad_rows(const at::Tensor& x, int64_t rows) {
  return x.size(1) == rows ? x : at::constant_pad_nd(x, {0, 0, 0, rows - x.size(1)}, 0);
}

// D = S / |S| - T / |T| (norms floored at eps) over C = max(Cs, Ct) rows, from the pooled,
// padded s and t [k, C, P], with the relative accuracy of e = S - T however small it is:
//   D = e / |S| + T c,  c = 1 / |S| - 1 / |T| = -<e, S + T> / ((|S| + |T|) |S| |T|),
// every term proportional to e; where |S| < |T| (floored norms), D = e / |T| + S c instead.
// Divided by the larger norm, no term exceeds 2: e / |S| and T c of a student far smaller than
// its teacher both reach |T| / |S| and cancel (float32 SKD 1e-2 off at a scale of 1e-3). Where
// a norm is floored, c is that of the floored norms.
at::Tensor normalised_difference(const at::Tensor& s, const at::Tensor& t, const at::Tensor& ns,
                                 const at::Tensor& nt, const at::Tensor& ns_c, const at::Tensor& nt_c) {
  at::Tensor e = s - t;
  at::Tensor q;
  {
    at::Tensor sum = s + t;
    q = sum.mul_(e).sum(1, /*keepdim=*/true);
  }
  const at::Tensor unfloored = at::minimum(ns, nt) > kAffinityNormEps, by_t = ns_c < nt_c;
  const at::Tensor c = at::where(unfloored, q.neg_().div_(ns + nt).div_(ns).div_(nt),
                                 ns_c.reciprocal() - nt_c.reciprocal());
  const at::Tensor zero = at::zeros({}, c.options());  // one fill; a Scalar in each where would be one apiece on CUDA
  return e.div_(at::where(by_t, nt_c, ns_c)).addcmul_(t, at::where(by_t, zero, c)).addcmul_(s, at::where(by_t, c, zero));
}

// A chunk's normalised student us [k, Cs, P], normalised difference d [k, C, P] and student
// norms ns [k, 1, P], float64, from its pooled student ps [k, Cs, P] and teacher pt [k, Ct, P]:
// formed in float64 whatever the input dtype, as the blocked formulation and the CUDA kernels
// form them (PixelScale, csrc/cuda/affinity_pivot.cuh: a student at another scale than its
// teacher makes D a difference of terms of size 1, into which float32 norms put their rounding
// whole; 8.9e-4 of float32 SKD at a scale of 1e-4 and pool 4, against 9e-6), and centred on the
// pixels' means before they are rounded (affinity_pivot).
struct Normalised {
  at::Tensor us, d, ns;
};

Normalised normalised(const at::Tensor& ps, const at::Tensor& pt, int64_t C) {
  const at::Tensor s = ps.to(at::kDouble), t = pt.to(at::kDouble);
  const at::Tensor ns = channel_norms(s), nt = channel_norms(t);
  const at::Tensor ns_c = ns.clamp_min(kAffinityNormEps), nt_c = nt.clamp_min(kAffinityNormEps);
  at::Tensor d = normalised_difference(pad_rows(s, C), pad_rows(t, C), ns, nt, ns_c, nt_c);
  return {s / ns_c, d, ns};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_batched(const at::Tensor& student,
                                                                     const at::Tensor& teacher, int64_t pool) {
  check_affinity_loss_inputs(student, teacher, pool);
  const auto acc = acc_dtype(student.scalar_type());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const int64_t H = student.size(2), W = student.size(3);
  const int64_t P = affinity_pooled_pixels(H, W, pool);
  const auto opts = student.options().dtype(acc);
  if (P == 0) return {at::zeros({B}, opts), at::zeros({B, Cs, Cs}, opts), at::zeros({B, Cs, Ct}, opts)};
  // every chunk writes its images' rows of all three in full: no fills
  at::Tensor gss = at::empty({B, Cs, Cs}, opts), gsd = at::empty({B, Cs, Ct}, opts);
  at::Tensor sums = at::empty({B}, opts.dtype(at::kDouble));
  const int64_t chunk = affinity_chunk_images(pool, B);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t k = std::min(chunk, B - b0);
    Normalised n = normalised(pooled(student.narrow(0, b0, k), pool, at::kDouble),
                              pooled(teacher.narrow(0, b0, k), pool, at::kDouble), C);
    const AffinityPivot pivot = affinity_pivot(n.us.sum(-1), n.d.sum(-1), P);
    const at::Tensor beta = centre_on_pivot(n.us, n.d, pivot);
    const at::Tensor x = n.us.to(acc), d = n.d.to(acc);
    at::Tensor g_ss = gss.narrow(0, b0, k);
    at::bmm_out(g_ss, x, x.transpose(1, 2));
    const at::Tensor g_sd = at::bmm(x, d.transpose(1, 2));  // [k, Cs, C]
    const at::Tensor g_dd = at::bmm(d, d.transpose(1, 2));  // [k, C, C]
    sums.narrow(0, b0, k).copy_(differenced_affinity_sum(g_ss, g_sd, g_dd) +
                                pivot_affinity_sum(pivot, beta.square().sum({-2, -1})));
    gsd.narrow(0, b0, k).copy_(affinity_saved_gram(g_sd, Ct));
  }
  return {affinity_means(sums, P, acc), gss, gsd};
}

// Per chunk, the pivot and the centred x, d formed again as in the forward, the gradient w.r.t.
// the normalised features 4 s_b (m_S r_i + u + G_xd x_i + G_xy d_i) (affinity_input_gradient,
// affinity_saved_gram) through the normalisation, into each window's argmax (windows do not
// overlap: one scatter).
at::Tensor affinity_loss_backward_batched(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& gss, const at::Tensor& gsd, int64_t pool) {
  check_affinity_loss_backward_inputs(grad, student, teacher, gss, gsd, pool);
  const auto acc = gss.scalar_type();
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const int64_t H = student.size(2), W = student.size(3);
  const int64_t P = affinity_pooled_pixels(H, W, pool);
  // pool 1 copies every element; pooling scatters into each window's argmax, so the rest is 0
  const auto out_opts = student.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor out = pool == 1 ? at::empty({B, Cs, H, W}, out_opts) : at::zeros({B, Cs, H, W}, out_opts);
  if (P == 0) return out;
  const at::Tensor scale = (grad.to(acc) * (4.0 / affinity_mean_divisor(P))).view({B, 1, 1});
  const int64_t chunk = affinity_chunk_images(pool, B);
  for (int64_t b0 = 0; b0 < B; b0 += chunk) {
    const int64_t k = std::min(chunk, B - b0);
    const at::Tensor xs = student.narrow(0, b0, k);
    at::Tensor ps, indices;
    if (pool == 1) {
      ps = xs.flatten(2);
    } else {
      auto [v, i] = at::max_pool2d_with_indices(xs, {pool, pool}, {pool, pool}, {0, 0}, {1, 1}, true);
      ps = v.flatten(2);
      indices = i.flatten(2);  // flat in each H x W plane
    }
    Normalised n = normalised(ps, pooled(teacher.narrow(0, b0, k), pool, at::kDouble), C);
    const AffinityPivot pivot = affinity_pivot(n.us.sum(-1), n.d.sum(-1), P);
    const at::Tensor gss_k = gss.narrow(0, b0, k), gsd_k = gsd.narrow(0, b0, k).to(acc);
    const auto [g_sd, g_st] = affinity_gram_operands(gss_k, gsd_k);
    const at::Tensor gy = pooled_student_gradient(n.us, n.d, n.ns, pivot, g_sd, g_st, pivot_u(gss_k, gsd_k, pivot),
                                                  scale.narrow(0, b0, k), acc)
                              .to(student.scalar_type());
    at::Tensor out_chunk = out.narrow(0, b0, k).view({k, Cs, H * W});
    if (pool == 1) {
      out_chunk.copy_(gy);
    } else {
      out_chunk.scatter_(2, indices, gy);
    }
  }
  return out;
}

}  // namespace idd_ops
