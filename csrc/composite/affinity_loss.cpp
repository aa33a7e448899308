// Structural (pairwise-affinity) KD loss through C x C Gram products, forward and backward.
// Device-generic: the work is three batched GEMMs, so one ATen implementation serves CPU and
// CUDA (registered under CompositeExplicitAutograd) and the P x P affinity is never formed.
//
// With F_S [B, Cs, P] and F_T [B, Ct, P] (L2-normalised over channels), A = F^T F:
//   sum (A_S - A_T)^2 = ||F_S F_S^T||^2 - 2 ||F_S F_T^T||^2 + ||F_T F_T^T||^2   (Frobenius)
//   d/dF_S = 4 (F_S F_S^T F_S - F_S F_T^T F_T)
// Extra memory: D = F_S - F_T, O(B*C*P), or (different channel counts) float64 copies of one
// image's features, O(C*P); and the C x C Grams.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace idd_ops {
namespace {

// Per-image sum over the P x P entries of (A_S - A_T)^2 when student and teacher have the same
// channel count: the differenced form. With D = F_S - F_T, A_S - A_T = F_S^T D + D^T F_T, so
//   sum (A_S - A_T)^2 = <G_ss, G_dd> + <G_dd, G_tt> + 2 <G_sd, G_td^T>      (G_xy = X Y^T)
// Every term carries a Gram of D, so the value keeps its relative accuracy however close the
// student is to the teacher, in the accumulation dtype and with three GEMMs: G_td = G_sd - G_dd,
// G_tt = G_ss - G_sd - G_sd^T + G_dd and G_st = G_ss - G_sd follow without further products.
std::tuple<at::Tensor, at::Tensor, at::Tensor> differenced_sums(const at::Tensor& fs, const at::Tensor& ft) {
  const at::Tensor d = fs - ft;
  const at::Tensor gss = at::bmm(fs, fs.transpose(1, 2));
  const at::Tensor gsd = at::bmm(fs, d.transpose(1, 2));
  const at::Tensor gdd = at::bmm(d, d.transpose(1, 2));
  const at::Tensor gtd = gsd - gdd;
  const at::Tensor gtt = gss - gsd - gsd.transpose(1, 2) + gdd;
  const auto dot = [](const at::Tensor& a, const at::Tensor& b) { return (a * b).to(at::kDouble).sum({1, 2}); };
  const at::Tensor sums = dot(gss, gdd) + dot(gdd, gtt) + 2 * dot(gsd, gtd.transpose(1, 2));
  return {sums, gss, gss - gsd};
}

// The same sums for different channel counts, where no D exists: the three Gram norms
// ||G_ss||^2 - 2 ||G_st||^2 + ||G_tt||^2 cancel as the student nears the teacher, so the Grams
// are accumulated in float64 (products of float32 values are exact there), one image at a time
// so that the float64 copies of the features cost O(C*P), not O(B*C*P).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gram_norm_sums(const at::Tensor& fs_in, const at::Tensor& ft_in) {
  const int64_t B = fs_in.size(0);
  const auto f64 = fs_in.options().dtype(at::kDouble);
  at::Tensor gss = at::empty({B, fs_in.size(1), fs_in.size(1)}, f64);
  at::Tensor gst = at::empty({B, fs_in.size(1), ft_in.size(1)}, f64);
  at::Tensor sums = at::empty({B}, f64);
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor fs = fs_in[b].to(at::kDouble), ft = ft_in[b].to(at::kDouble);
    at::Tensor gss_b = gss[b], gst_b = gst[b];
    at::mm_out(gss_b, fs, fs.t());
    at::mm_out(gst_b, fs, ft.t());
    const at::Tensor gtt = at::mm(ft, ft.t());
    sums[b].copy_(gss_b.square().sum() - 2 * gst_b.square().sum() + gtt.square().sum());
  }
  return {sums, gss, gst};
}

// Returns (per-image loss [B], G_ss, G_st): entry b is the mean over the P*P affinity entries of
// image b, in the accumulation dtype; the two Gram products are what the backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss(const at::Tensor& fs_in, const at::Tensor& ft_in) {
  check_affinity_loss_inputs(fs_in, ft_in);
  const auto acc = acc_dtype(fs_in.scalar_type());
  const at::Tensor fs = fs_in.to(acc), ft = ft_in.to(acc);
  auto [sums, gss, gst] = fs.size(1) == ft.size(1) ? differenced_sums(fs, ft) : gram_norm_sums(fs, ft);
  // A sum of squares is >= 0; the clamp only removes rounding at 0.
  const double P = static_cast<double>(fs.size(2));
  return {(sums.clamp_min(0) / std::max(P * P, 1.0)).to(acc), gss.to(acc), gst.to(acc)};
}

// grad [B] (one value per image's loss) -> d/dF_S [B, Cs, P].
at::Tensor affinity_loss_backward(const at::Tensor& grad, const at::Tensor& fs_in, const at::Tensor& ft_in,
                                  const at::Tensor& gss, const at::Tensor& gst) {
  check_affinity_loss_backward_inputs(grad, fs_in, ft_in, gss, gst);
  const auto acc = gss.scalar_type();
  const at::Tensor fs = fs_in.to(acc), ft = ft_in.to(acc);
  const int64_t B = fs.size(0), P = fs.size(2);
  const double denom = std::max(static_cast<double>(P) * static_cast<double>(P), 1.0);
  const at::Tensor scale = grad.to(acc).reshape({B, 1, 1}) * (4.0 / denom);
  return (scale * (at::bmm(gss, fs) - at::bmm(gst, ft))).to(fs_in.scalar_type());
}

}  // namespace

// One implementation for every device: it is built from ATen GEMMs.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("affinity_loss", &affinity_loss);
  m.impl("_affinity_loss_backward", &affinity_loss_backward);
}

}  // namespace idd_ops
