// Per-pixel cosine similarity to the pixel's class centroid (the IFVD map), forward and
// backward, on the CPU. Ignored pixels score 1 and carry no gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../common/checks.h"
#include "../common/cosine.h"
#include "label_runs.h"

namespace idd_ops {
namespace {

// Pixels per task in the forward: the loop over channels streams each row segment once.
constexpr int64_t kPixelTile = 256;

// Class slot of every feature pixel of every image ([B * H * W], -1 ignored), from the runs.
std::vector<int32_t> pixel_slots(const at::Tensor& labels, int64_t H, int64_t W, int64_t K, int64_t ignore_index) {
  const auto runs = label_runs_per_image(labels, H, W, K, ignore_index);
  std::vector<int32_t> slot(labels.size(0) * H * W);
  for (size_t b = 0; b < runs.size(); ++b)
    for (int64_t r = 0; r < runs[b].size(); ++r)
      std::fill(slot.begin() + b * H * W + runs[b].start[r], slot.begin() + b * H * W + runs[b].start[r + 1],
                static_cast<int32_t>(runs[b].cls[r]));
  return slot;
}

// Centroid norms [B * K] in the accumulation type.
template <typename acc_t>
std::vector<acc_t> centroid_norms(const acc_t* cent, int64_t BK, int64_t C) {
  std::vector<acc_t> out(BK);
  for (int64_t bk = 0; bk < BK; ++bk) {
    acc_t s = 0;
    for (int64_t c = 0; c < C; ++c) s += cent[bk * C + c] * cent[bk * C + c];
    out[bk] = std::sqrt(s);
  }
  return out;
}

// Returns (cos map [B, H, W], feature norms [B, H, W]), both in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_kernel(const at::Tensor& feats_in, const at::Tensor& centroids_in,
                                                                const at::Tensor& labels, int64_t ignore_index,
                                                                double eps) {
  const int64_t K = centroids_in.size(1);
  check_feats_labels(feats_in, labels, K);
  const at::Tensor feats = feats_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3), HW = H * W;
  const auto acc = acc_dtype(feats.scalar_type());
  TORCH_CHECK_VALUE(centroids_in.dim() == 3 && centroids_in.size(0) == B && centroids_in.size(2) == C,
                    "centroids: expected [B, K, C] = [", B, ", K, ", C, "], got ", centroids_in.sizes());
  const at::Tensor cent = centroids_in.to(acc).contiguous();
  at::Tensor cos = at::ones({B, H, W}, feats.options().dtype(acc));
  at::Tensor fnorm = at::zeros({B, H, W}, feats.options().dtype(acc));
  if (cos.numel() == 0) return {cos, fnorm};
  const auto slot = pixel_slots(labels, H, W, K, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    const acc_t* cp = cent.const_data_ptr<acc_t>();
    const auto cnorm = centroid_norms(cp, B * K, C);
    acc_t* cos_p = cos.data_ptr<acc_t>();
    acc_t* fn_p = fnorm.data_ptr<acc_t>();
    const int64_t tiles = (HW + kPixelTile - 1) / kPixelTile;
    at::parallel_for(0, B * tiles, 1, [&](int64_t t0, int64_t t1) {
      acc_t dot[kPixelTile], nf[kPixelTile];
      for (int64_t task = t0; task < t1; ++task) {
        // (b, tile) is one run of pixels of one image
        const int64_t b = task / tiles, p0 = (task % tiles) * kPixelTile, n = std::min(kPixelTile, HW - p0);
        const int32_t* y = slot.data() + b * HW + p0;
        std::fill(dot, dot + n, acc_t(0));
        std::fill(nf, nf + n, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* x = f + (b * C + c) * HW + p0;
          const acc_t* cc = cp + b * K * C + c;  // centroid k, channel c at cc[k * C]
          for (int64_t p = 0; p < n; ++p) {
            const acc_t v = static_cast<acc_t>(x[p]);
            dot[p] += y[p] >= 0 ? v * cc[y[p] * C] : acc_t(0);
            nf[p] += v * v;
          }
        }
        for (int64_t p = 0; p < n; ++p) {
          const acc_t norm = std::sqrt(nf[p]);
          fn_p[b * HW + p0 + p] = norm;
          if (y[p] >= 0) cos_p[b * HW + p0 + p] = clamped_cosine(dot[p], norm, cnorm[b * K + y[p]], static_cast<acc_t>(eps));
        }
      }
    });
  });
  return {cos, fnorm};
}

// Gradients w.r.t. feats and centroids from the gradient of the cos map, using the forward's
// cos map and feature norms (so the backward reads the features once).
std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_backward_kernel(
    const at::Tensor& grad_in, const at::Tensor& feats_in, const at::Tensor& centroids_in, const at::Tensor& labels,
    const at::Tensor& cos_in, const at::Tensor& fnorm_in, int64_t ignore_index, double eps) {
  const at::Tensor feats = feats_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3), HW = H * W;
  const int64_t K = centroids_in.size(1);
  const auto acc = acc_dtype(feats.scalar_type());
  const at::Tensor cent = centroids_in.to(acc).contiguous();
  const at::Tensor grad = grad_in.to(acc).contiguous(), cosv = cos_in.contiguous(), fnorm = fnorm_in.contiguous();
  at::Tensor grad_f = at::empty_like(feats);
  at::Tensor grad_c = at::zeros({B, K, C}, feats.options().dtype(acc));
  if (feats.numel() == 0) return {grad_f, grad_c.to(centroids_in.scalar_type())};
  const auto slot = pixel_slots(labels, H, W, K, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    const acc_t* cp = cent.const_data_ptr<acc_t>();
    const auto cnorm = centroid_norms(cp, B * K, C);
    // Per pixel: grad_f = a * c_y + bf * f; contribution to grad c_y = a * f + bc * c_y.
    std::vector<acc_t> a(B * HW, 0), bf(B * HW, 0), bc_sum(B * K, 0);
    for (int64_t e = 0; e < B * HW; ++e) {
      const int64_t b = e / HW;
      const int32_t k = slot[e];
      if (k < 0) continue;
      const acc_t g = grad.const_data_ptr<acc_t>()[e];
      const CosineGrad<acc_t> cg = clamped_cosine_grad(cosv.const_data_ptr<acc_t>()[e], fnorm.const_data_ptr<acc_t>()[e],
                                                       cnorm[b * K + k], static_cast<acc_t>(eps));
      a[e] = g * cg.alpha, bf[e] = g * cg.beta_f;
      bc_sum[b * K + k] += g * cg.beta_c;
    }
    scalar_t* gf = grad_f.data_ptr<scalar_t>();
    acc_t* gc = grad_c.data_ptr<acc_t>();
    at::parallel_for(0, B * C, 4, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> sums(K);
      for (int64_t row = r0; row < r1; ++row) {
        // (b, c) is one row of the feature map
        const int64_t b = row / C, c = row % C;
        const scalar_t* x = f + row * HW;
        const int32_t* y = slot.data() + b * HW;
        const acc_t* ab = a.data() + b * HW;
        const acc_t* bb = bf.data() + b * HW;
        std::fill(sums.begin(), sums.end(), acc_t(0));
        for (int64_t p = 0; p < HW; ++p) {
          const acc_t v = static_cast<acc_t>(x[p]);
          const acc_t cy = y[p] >= 0 ? cp[(b * K + y[p]) * C + c] : acc_t(0);
          gf[row * HW + p] = static_cast<scalar_t>(ab[p] * cy + bb[p] * v);
          if (y[p] >= 0) sums[y[p]] += ab[p] * v;
        }
        for (int64_t k = 0; k < K; ++k) gc[(b * K + k) * C + c] = sums[k] + bc_sum[b * K + k] * cp[(b * K + k) * C + c];
      }
    });
  });
  return {grad_f, grad_c.to(centroids_in.scalar_type())};
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("pixel_centroid_cosine", &pixel_centroid_cosine_kernel);
  m.impl("_pixel_centroid_cosine_backward", &pixel_centroid_cosine_backward_kernel);
}

}  // namespace idd_ops
