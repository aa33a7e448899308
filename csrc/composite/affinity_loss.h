#pragma once
// SKD's loss through C x C Gram products (affinity_loss.cpp): what its two formulations share.
//   blocked (affinity_loss.cpp): per image, blocks of pooled pixels; the CPU's path.
//   batched (affinity_loss_batched.cpp): chunks of whole images, batched GEMMs; CUDA's path,
//     with its pointwise work fused into kernels there
//     (csrc/cuda/affinity_loss_cuda.cu).
// Both return and consume the same (loss [B], G_xx [B, Cs, Cs], G_xd [B, Cs, Ct]: the Grams of
// S and D centred on the image's means (affinity_pivot), G_xd's first Ct columns, see
// affinity_saved_gram), so either backward serves either forward. The differenced forms below
// are written for any S and D (x and d: the centred ones are what the formulations pass).
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <utility>

namespace idd_ops {

// F.normalize's floor of the norm.
constexpr double kAffinityNormEps = 1e-12;

// Pooled pixels P of an H x W map under pool x pool windows in ceil mode.
inline int64_t affinity_pooled_pixels(int64_t H, int64_t W, int64_t pool) {
  return ((H + pool - 1) / pool) * ((W + pool - 1) / pool);
}

// The mean's divisor of one image: P * P affinity entries (1 when there are none).
inline double affinity_mean_divisor(int64_t pooled_pixels) {
  const double P = static_cast<double>(pooled_pixels);
  return std::max(P * P, 1.0);
}

// Images per chunk of the batched formulation (affinity_loss_batched.cpp): pool * pool, so that a
// chunk's pooled features hold about as many values as one input image; at most the batch (and
// no overflow for a huge pool).
inline int64_t affinity_chunk_images(int64_t pool, int64_t batch) {
  return pool >= batch ? batch : std::min(pool * pool, batch);
}

// _affinity_loss_sum's factor on the per-image means: 1 / B for the mean over all B * P * P
// entries (no images: a factor of 1 on no means, so a loss of 0, as idd_ops' "mean" of nothing
// counted), P * P for their sum.
inline double affinity_sum_scale(int64_t batch, int64_t pooled_pixels, bool mean) {
  const double P = static_cast<double>(pooled_pixels);
  return mean ? 1.0 / static_cast<double>(std::max<int64_t>(batch, 1)) : P * P;
}

// _affinity_loss_sum's loss from the per-image means [B]: their sum in float64 times `scale`, in
// their dtype.
inline at::Tensor affinity_loss_total(const at::Tensor& means, double scale) {
  return (means.sum(0, /*keepdim=*/false, at::kDouble) * scale).to(means.scalar_type());
}

// _affinity_loss_sum_backward's incoming gradient (one value) as affinity_loss's backward takes it:
// times `scale`, in `dtype` (the Grams'), one value for every image of `batch` (a stride-0 view).
inline at::Tensor affinity_sum_grad(const at::Tensor& grad, double scale, int64_t batch, at::ScalarType dtype) {
  return (grad.reshape({}).to(at::kDouble) * scale).to(dtype).expand({batch});
}

// Per-image means [B] in `acc` from the float64 sums of squares over P * P entries. A sum of
// squares is >= 0; the clamp only removes rounding at 0.
inline at::Tensor affinity_means(const at::Tensor& sums, int64_t pooled_pixels, at::ScalarType acc) {
  return (sums.clamp_min(0) / affinity_mean_divisor(pooled_pixels)).to(acc);
}

// sum (A_S - A_T)^2 from the Grams of the differenced form, over the last two dims (leading
// dims are images), in float64. With D = S - T over C = max(Cs, Ct) rows (the narrower network's
// features padded with zero rows, which leaves its affinity unchanged), A_S - A_T = S^T D + D^T T
// and, with G_xy = X Y^T and G_tt = G_ss - G_sd - G_sd^T + G_dd,
//   sum (A_S - A_T)^2 = 2 <G_ss, G_dd> - 4 <G_dd, G_sd> + <G_dd, G_dd> + 2 <G_sd, G_sd^T>.
// Every term carries a Gram of D, so the value keeps its relative accuracy in float32 however
// close the student is to the teacher (the plain three Gram norms cancel). g_ss [.., Cs, Cs],
// g_sd [.., Cs, C], g_dd [.., C, C]: S's padded rows add nothing, so each inner product reads
// only the blocks where both of its factors can be nonzero.
inline at::Tensor differenced_affinity_sum(const at::Tensor& g_ss, const at::Tensor& g_sd, const at::Tensor& g_dd) {
  const int64_t Cs = g_ss.size(-1);
  const auto dot = [](const at::Tensor& a, const at::Tensor& b) {
    return (a * b).sum({-2, -1}, /*keepdim=*/false, at::kDouble);
  };
  const at::Tensor g_dd_s = g_dd.narrow(-2, 0, Cs), g_sd_s = g_sd.narrow(-1, 0, Cs);
  return 2 * dot(g_ss, g_dd_s.narrow(-1, 0, Cs)) - 4 * dot(g_dd_s, g_sd) + dot(g_dd, g_dd) +
         2 * dot(g_sd_s, g_sd_s.transpose(-2, -1));
}

// The pixels' mean directions, the pivot of both formulations (METHOD.md 8). Features that share a
// large offset turn every affinity toward 1; Grams of the normalised features S, D would then
// round at the offset's size. Around the means m_S, m_D = m_S - m_T (over the image's P pooled
// pixels; the narrower network padded with zero rows) the Grams carry only the spread: with
// x_i = S_i - m_S, d_i = D_i - m_D (so y_i = T_i - m_T = x_i - d_i),
//   A_S - A_T = alpha + beta_i + beta_j + E_ij,  alpha = |m_S|^2 - |m_T|^2 = <m_D, m_S + m_T>,
//   beta_i = <m_S, x_i> - <m_T, y_i> = <m_D, x_i> + <m_T, d_i>,  E_ij = <x_i, x_j> - <y_i, y_j>,
// and as the x_i and d_i sum to 0 the cross terms vanish:
//   sum_ij (A_S - A_T)^2 = P^2 alpha^2 + 2 P sum_i beta_i^2 + sum_ij E_ij^2,
// the last the differenced form above over x and d. Every term is >= 0: nothing cancels.
// Tensors are [.., C, p]: channels in dim -2, pixels in dim -1 (an image's block, or a chunk).
struct AffinityPivot {
  at::Tensor m_s, m_d, m_t;  // [.., Cs, 1], [.., C, 1], [.., C, 1]; float64
  at::Tensor alpha;          // [..] float64
  double pixels;             // P
};

// From the float64 sums over the P pixels of S [.., Cs] and of D [.., C].
inline AffinityPivot affinity_pivot(const at::Tensor& sum_s, const at::Tensor& sum_d, int64_t pooled_pixels) {
  const double P = static_cast<double>(std::max<int64_t>(pooled_pixels, 1));
  const int64_t Cs = sum_s.size(-1), C = sum_d.size(-1);
  AffinityPivot v;
  v.pixels = static_cast<double>(pooled_pixels);
  v.m_s = (sum_s / P).unsqueeze(-1);
  v.m_d = (sum_d / P).unsqueeze(-1);
  v.m_t = (Cs == C ? v.m_s : at::constant_pad_nd(v.m_s, {0, 0, 0, C - Cs}, 0)) - v.m_d;
  v.alpha = (v.m_d * (2 * v.m_t + v.m_d)).sum({-2, -1});  // m_S + m_T = 2 m_T + m_D, padded
  return v;
}

// Centres float64 S [.., Cs, p] and D [.., C, p] in place (x = S - m_S, d = D - m_D), where given
// only the pixels where `centre` [.., 1, p] is true, and returns beta [.., 1, p] (float64) of
// the columns as they then are: <m_D, x_i> + <m_T, d_i>, or <m_D, S_i> + <m_T, D_i>.
inline at::Tensor centre_on_pivot(at::Tensor& s, at::Tensor& d, const AffinityPivot& v,
                                  const at::Tensor& centre = at::Tensor()) {
  const int64_t Cs = s.size(-2);
  s.sub_(centre.defined() ? v.m_s * centre : v.m_s);
  d.sub_(centre.defined() ? v.m_d * centre : v.m_d);
  // two products with the means, where a product and a sum over channels would copy [.., C, p]
  return at::matmul(v.m_d.narrow(-2, 0, Cs).transpose(-2, -1), s).add_(at::matmul(v.m_t.transpose(-2, -1), d));
}

// P^2 alpha^2 + 2 P sum_i beta_i^2 over each image's pixels: the part of sum (A_S - A_T)^2 that
// the Grams do not carry. beta_sq_sum: sum_i beta_i^2 [..].
inline at::Tensor pivot_affinity_sum(const AffinityPivot& v, const at::Tensor& beta_sq_sum) {
  const double P = v.pixels;
  return v.alpha * v.alpha * (P * P) + beta_sq_sum * (2 * P);
}

// The backward's u = sum_j beta_j x_j [.., Cs, 1] (float64) from the kept Grams (centred:
// G_xx [.., Cs, Cs], G_xd's first Ct columns [.., Cs, Ct]): G_xx m_D + G_xd m_T, m_T being 0
// past Ct.
inline at::Tensor pivot_u(const at::Tensor& gss, const at::Tensor& gsd, const AffinityPivot& v) {
  const int64_t Cs = gss.size(-1), Ct = gsd.size(-1);
  return at::matmul(gss.to(at::kDouble), v.m_d.narrow(-2, 0, Cs)) +
         at::matmul(gsd.to(at::kDouble), v.m_t.narrow(-2, 0, Ct));
}

// The student's gradient per pixel, through the normalisation, from the gradient w.r.t. S_i,
// g_i = 4 sum_j (A_S - A_T)_ij S_j (times the loss's scale, which `v` and `rho` carry):
// - a pixel whose norm is not floored takes g_i = 4 (m_S r_i + u + G_xd x_i + G_xy d_i) with
//   r_i = P (alpha + beta_i) and u = sum_j beta_j x_j. As m_S = S_i - x_i, that is r_i S_i + w_i
//   with w_i = u + G_xd x_i + G_xy d_i - r_i x_i, and the projection (g - S <S, g>) / |f| removes
//   r_i S_i of a unit S_i exactly: w alone is projected, whose terms are of the spread's size
//   (projecting the large r_i S_i would leave its rounding);
// - a pixel whose norm is floored (S_i is f / eps, not a unit vector: the gradient is g / eps,
//   which magnifies any rounding 10^12 times) keeps its columns uncentred (centre_on_pivot) and
//   takes the same sum as g_i = 4 (G_xd S_i + G_xy D_i + P m_S beta_i) (sum_j S_j S_j^T =
//   G_xx + P m_S m_S^T and so on), every term proportional to S_i or D_i: 0 where both are, as
//   the reference's.
// v [.., Cs, p]: the GEMMs' G_xd x + G_xy d, plus u where the norm is not floored (overwritten);
// s the normalised features S, x the GEMMs' student operand, rho = P (beta_i + alpha) or
// P beta_i, ns the norms [.., 1, p], m_s [.., Cs, 1]; one dtype.
inline at::Tensor affinity_input_gradient(at::Tensor& v, const at::Tensor& s, const at::Tensor& x,
                                          const at::Tensor& m_s, const at::Tensor& rho, const at::Tensor& ns) {
  const at::Tensor unfloored = ns > kAffinityNormEps;
  v.sub_(rho * at::where(unfloored, x, m_s.neg()));
  const at::Tensor along = (s * v).sum(-2, /*keepdim=*/true).mul_(unfloored);
  return v.addcmul_(s, along, -1).div_(ns.clamp_min(kAffinityNormEps));
}

// The gradient w.r.t. the pooled student [.., Cs, p] of one block or chunk, in `acc`, before the
// pooling routes it: s64 [.., Cs, p] and d64 [.., C, p] its float64 normalised features and
// difference (centred here, in place), ns its float64 norms [.., 1, p], g_sd and g_st the GEMM
// operands (affinity_gram_operands), u from pivot_u, scale the loss's (broadcast over [.., Cs, p]).
inline at::Tensor pooled_student_gradient(at::Tensor& s64, at::Tensor& d64, const at::Tensor& ns,
                                          const AffinityPivot& pivot, const at::Tensor& g_sd, const at::Tensor& g_st,
                                          const at::Tensor& u, const at::Tensor& scale, at::ScalarType acc) {
  // S as normalised, for the projection: a unit vector to its last bit, which x + m_S is not (a
  // one-channel student, S = +-1 and a gradient of 0, kept 1e-16 of the large w)
  const at::Tensor s = s64.to(acc, /*non_blocking=*/false, /*copy=*/true);
  const at::Tensor unfloored = ns > kAffinityNormEps;
  const at::Tensor beta = centre_on_pivot(s64, d64, pivot, unfloored);
  const at::Tensor alpha = pivot.alpha.unsqueeze(-1).unsqueeze(-1);
  const at::Tensor rho = beta.add_(alpha * unfloored).mul_(pivot.pixels);
  const at::Tensor x = s64.to(acc);
  at::Tensor v = at::matmul(g_sd, x).add_(at::matmul(g_st, d64.narrow(-2, 0, g_st.size(-1)).to(acc)));
  v.addcmul_(u.to(acc), unfloored).mul_(scale);
  return affinity_input_gradient(v, s, x, pivot.m_s.to(acc), (rho * scale).to(acc), ns.to(acc));
}

// The backward keeps G_sd's first Ct columns ([.., Cs, Ct]) beside G_ss, not G_st = S T^T: the
// student's gradient is 4 (G_sd U_S + G_st D) (T = S - D), each term shrinking as the affinities
// near each other (and as they near 1) where G_ss U_S - G_st U_T cancels. G_sd formed in the
// backward as G_ss - G_st from a saved G_st (rounded at G_ss's size) would cancel in turn; G_st
// = G_ss - G_sd rounds at G_st's own size. Float32 gradient of a student 1e-3 from its teacher:
// 4.9e-3 relative error before, 6e-7 after (METHOD.md 8).
inline at::Tensor affinity_saved_gram(const at::Tensor& g_sd, int64_t Ct) { return g_sd.narrow(-1, 0, Ct); }

// The backward's GEMM operands from the saved G_ss [.., Cs, Cs] and G_sd [.., Cs, Ct]: G_sd over
// Cs columns (past Ct, D's rows are S's own, the teacher being padded with zeros: G_ss's
// columns) and G_st = G_ss - G_sd over Ct columns (past Cs, S's rows are 0: -G_sd).
inline std::pair<at::Tensor, at::Tensor> affinity_gram_operands(const at::Tensor& gss, const at::Tensor& gsd) {
  const int64_t Cs = gss.size(-1), Ct = gsd.size(-1), shared = std::min(Cs, Ct);
  at::Tensor g_sd = Ct >= Cs ? gsd.narrow(-1, 0, Cs) : at::cat({gsd, gss.narrow(-1, Ct, Cs - Ct)}, -1);
  at::Tensor g_st = gsd.neg();
  g_st.narrow(-1, 0, shared).add_(gss.narrow(-1, 0, shared));
  return {g_sd, g_st};
}

// The composite op: the blocked formulation, or the batched one where use_batched picks it
// (affinity_loss.cpp). CUDA's registration (affinity_loss_cuda.cu) calls it by default.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_composite(const at::Tensor& student,
                                                                       const at::Tensor& teacher, int64_t pool);
at::Tensor affinity_loss_backward_composite(const at::Tensor& grad, const at::Tensor& student,
                                            const at::Tensor& teacher, const at::Tensor& gss, const at::Tensor& gsd,
                                            int64_t pool);

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_batched(const at::Tensor& student,
                                                                     const at::Tensor& teacher, int64_t pool);
at::Tensor affinity_loss_backward_batched(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                          const at::Tensor& gss, const at::Tensor& gsd, int64_t pool);

}  // namespace idd_ops
