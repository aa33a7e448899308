// Structural (pairwise-affinity) KD loss through C x C Gram products, forward and backward.
// Device-generic: the work is three batched GEMMs, so one ATen implementation serves CPU and
// CUDA (registered under CompositeExplicitAutograd) and the P x P affinity is never formed.
//
// With F_S [B, Cs, P] and F_T [B, Ct, P] (L2-normalised over channels), A = F^T F:
//   sum (A_S - A_T)^2 = ||F_S F_S^T||^2 - 2 ||F_S F_T^T||^2 + ||F_T F_T^T||^2   (Frobenius)
//   d/dF_S = 4 (F_S F_S^T F_S - F_S F_T^T F_T)
// Extra memory: float64 copies of one image's features, O(C*P), and the C x C Grams.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace idd_ops {
namespace {

void check_affinity_inputs(const at::Tensor& fs, const at::Tensor& ft) {
  TORCH_CHECK_VALUE(fs.dim() == 3 && ft.dim() == 3, "student: expected [B, C, P] features, got ", fs.sizes(),
                    " and ", ft.sizes());
  TORCH_CHECK_VALUE(fs.size(0) == ft.size(0) && fs.size(2) == ft.size(2), "teacher: expected the student's batch and ",
                    "pixel count, got ", ft.sizes(), " vs ", fs.sizes());
}

// Returns (per-image loss [B], G_ss, G_st): entry b is the mean over the P*P affinity entries of
// image b, in the accumulation dtype; the two Gram products are what the backward needs.
// The Grams are accumulated in float64: the three norms cancel as the student nears the teacher
// (their difference is O(|A_S - A_T|^2) while each is O(P^2)), and Grams rounded to float32 would
// leave the value with a relative error that grows without bound as the loss goes to 0. Products of
// float32 values are exact in float64, so float64 Grams of the float32 features make the value as
// accurate as the features themselves.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss(const at::Tensor& fs_in, const at::Tensor& ft_in) {
  check_affinity_inputs(fs_in, ft_in);
  const auto acc = acc_dtype(fs_in.scalar_type());
  const int64_t B = fs_in.size(0), P = fs_in.size(2);
  const auto f64 = fs_in.options().dtype(at::kDouble);
  at::Tensor gss = at::empty({B, fs_in.size(1), fs_in.size(1)}, f64);
  at::Tensor gst = at::empty({B, fs_in.size(1), ft_in.size(1)}, f64);
  at::Tensor per_image = at::empty({B}, f64);
  // One image at a time, so the float64 copies of the features cost O(C*P), not O(B*C*P).
  for (int64_t b = 0; b < B; ++b) {
    const at::Tensor fs = fs_in[b].to(at::kDouble), ft = ft_in[b].to(at::kDouble);
    at::Tensor gss_b = gss[b], gst_b = gst[b];
    at::mm_out(gss_b, fs, fs.t());
    at::mm_out(gst_b, fs, ft.t());
    const at::Tensor gtt = at::mm(ft, ft.t());
    // A sum of squares is >= 0; the clamp only removes float64 rounding (relative 1e-16) at 0.
    per_image[b].copy_((gss_b.square().sum() - 2 * gst_b.square().sum() + gtt.square().sum()).clamp_min(0));
  }
  const double denom = std::max(static_cast<double>(P) * static_cast<double>(P), 1.0);
  return {(per_image / denom).to(acc), gss.to(acc), gst.to(acc)};
}

// grad [B] (one value per image's loss) -> d/dF_S [B, Cs, P].
at::Tensor affinity_loss_backward(const at::Tensor& grad, const at::Tensor& fs_in, const at::Tensor& ft_in,
                                  const at::Tensor& gss, const at::Tensor& gst) {
  check_affinity_inputs(fs_in, ft_in);
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
