// Structural (pairwise-affinity) KD loss through C x C Gram products, forward and backward.
// Device-generic: the work is three batched GEMMs, so one ATen implementation serves CPU and
// CUDA (registered under CompositeExplicitAutograd) and the P x P affinity is never formed.
//
// With F_S [B, Cs, P] and F_T [B, Ct, P] (L2-normalised over channels), A = F^T F:
//   sum (A_S - A_T)^2 = ||F_S F_S^T||^2 - 2 ||F_S F_T^T||^2 + ||F_T F_T^T||^2   (Frobenius)
//   d/dF_S = 4 (F_S F_S^T F_S - F_S F_T^T F_T)
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../common/checks.h"

namespace idd_ops {
namespace {

// Returns (loss, G_ss, G_st); the two Gram products are what the backward needs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss(const at::Tensor& fs_in, const at::Tensor& ft_in) {
  check_affinity_loss_inputs(fs_in, ft_in);
  const auto acc = acc_dtype(fs_in.scalar_type());
  const at::Tensor fs = fs_in.to(acc), ft = ft_in.to(acc);
  const int64_t B = fs.size(0), P = fs.size(2);
  const at::Tensor gss = at::bmm(fs, fs.transpose(1, 2));
  const at::Tensor gst = at::bmm(fs, ft.transpose(1, 2));
  const at::Tensor gtt = at::bmm(ft, ft.transpose(1, 2));
  // The three norms are summed in float64: their difference cancels when student ~ teacher.
  const at::Tensor total = gss.to(at::kDouble).square().sum() - 2 * gst.to(at::kDouble).square().sum() +
                           gtt.to(at::kDouble).square().sum();
  const double denom = static_cast<double>(std::max<int64_t>(B, 1)) * static_cast<double>(P) * static_cast<double>(P);
  return {(total.clamp_min(0) / std::max(denom, 1.0)).to(fs_in.scalar_type()), gss, gst};
}

at::Tensor affinity_loss_backward(const at::Tensor& grad, const at::Tensor& fs_in, const at::Tensor& ft_in,
                                  const at::Tensor& gss, const at::Tensor& gst) {
  check_affinity_loss_backward_inputs(grad, fs_in, ft_in, gss, gst);
  const auto acc = gss.scalar_type();
  const at::Tensor fs = fs_in.to(acc), ft = ft_in.to(acc);
  const int64_t B = fs.size(0), P = fs.size(2);
  const double denom = std::max(static_cast<double>(B) * static_cast<double>(P) * static_cast<double>(P), 1.0);
  const at::Tensor scale = grad.to(acc) * (4.0 / denom);
  return (scale * (at::bmm(gss, fs) - at::bmm(gst, ft))).to(fs_in.scalar_type());
}

}  // namespace

// One implementation for every device: it is built from ATen GEMMs.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("affinity_loss", &affinity_loss);
  m.impl("_affinity_loss_backward", &affinity_loss_backward);
}

}  // namespace idd_ops
