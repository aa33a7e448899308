#pragma once
// SKD's loss through C x C Gram products (affinity_loss.cpp): what its two formulations share.
//   blocked (affinity_loss.cpp): per image, blocks of pooled rows; the CPU's path.
//   batched (affinity_loss_batched.cpp): chunks of whole images, batched GEMMs; CUDA's path
//     under IDD_OPS_CUDA_NEXT=1, with its pointwise work fused into kernels there
//     (csrc/cuda/affinity_loss_cuda.cu).
// Both return and consume the same (loss [B], G_ss [B, Cs, Cs], G_sd [B, Cs, Ct]: the first Ct
// columns of S D^T, see affinity_saved_gram), so either backward serves either forward.
#include <ATen/ATen.h>

#include <algorithm>
#include <tuple>
#include <utility>

namespace idd_ops {

// F.normalize's floor of the norm.
constexpr double kAffinityNormEps = 1e-12;

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
