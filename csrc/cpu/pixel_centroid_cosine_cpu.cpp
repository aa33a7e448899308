// Per-pixel cosine similarity to the pixel's class centroid (the IFVD map), forward and
// backward, on the CPU, with the pixel classes read from labels (pixel_centroid_cosine) or from
// a class-slot map (_pixel_centroid_cosine_slots). Ignored pixels score 1 and carry no gradient.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <vector>

#include "../common/checks.h"
#include "../common/cosine.h"
#include "label_runs.h"

namespace idd_ops {
namespace {

// Most pixels per task in the forward. A task walks every channel row of its pixel tile, so
// long tiles stream the rows (at 256 pixels, 1 KiB segments 32 KiB apart, the teacher's
// map took 60 ms against 36 ms for whole 64 x 128 images), while the tile's two accumulators
// (8 bytes a pixel in float32) stay in the L2 cache.
constexpr int64_t kMaxPixelTile = 8192;

// Pixels per forward task: at most kMaxPixelTile, and small enough that every thread gets a
// task when the batch is smaller than the thread count.
int64_t pixel_tile(int64_t B, int64_t HW) {
  const int64_t per_image = std::max((HW + kMaxPixelTile - 1) / kMaxPixelTile,
                                     (at::get_num_threads() + B - 1) / std::max<int64_t>(B, 1));
  return std::max<int64_t>(1, (HW + per_image - 1) / per_image);
}

// Calls fn(first, last, k) for the runs of `rb` that overlap pixels [p0, p1), clipped to them
// (k = -1 for ignored pixels): the inner loops then see one class per span and vectorise.
template <typename Fn>
inline void for_each_run(const LabelRuns& rb, int64_t p0, int64_t p1, Fn fn) {
  int64_t r = std::upper_bound(rb.start.begin(), rb.start.end(), p0) - rb.start.begin() - 1;
  for (; r < rb.size() && rb.start[r] < p1; ++r)
    fn(std::max(rb.start[r], p0), std::min(rb.start[r + 1], p1), rb.cls[r]);
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

// Returns (cos map [B, H, W], feature norms [B, H, W]), both in the accumulation dtype, for the
// pixel classes given as runs (built from labels or from a slot map: the only difference of the
// two ops).
std::tuple<at::Tensor, at::Tensor> cosine_forward(const at::Tensor& feats_in, const at::Tensor& centroids_in,
                                                  const std::vector<LabelRuns>& runs, double eps) {
  const int64_t K = centroids_in.size(1);
  const at::Tensor feats = feats_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3), HW = H * W;
  const auto acc = acc_dtype(feats.scalar_type());
  const at::Tensor cent = centroids_in.to(acc).contiguous();
  at::Tensor cos = at::ones({B, H, W}, feats.options().dtype(acc));
  at::Tensor fnorm = at::zeros({B, H, W}, feats.options().dtype(acc));
  if (cos.numel() == 0) return {cos, fnorm};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    const acc_t* cp = cent.const_data_ptr<acc_t>();
    const auto cnorm = centroid_norms(cp, B * K, C);
    acc_t* cos_p = cos.data_ptr<acc_t>();
    acc_t* fn_p = fnorm.data_ptr<acc_t>();
    const int64_t tile = pixel_tile(B, HW), tiles = (HW + tile - 1) / tile;
    at::parallel_for(0, B * tiles, 1, [&](int64_t t0, int64_t t1) {
      std::vector<acc_t> dot_v(tile), nf_v(tile);
      acc_t* dot = dot_v.data();
      acc_t* nf = nf_v.data();
      for (int64_t task = t0; task < t1; ++task) {
        // (b, tile) is one run of pixels of one image
        const int64_t b = task / tiles, p0 = (task % tiles) * tile, n = std::min(tile, HW - p0);
        std::fill(dot, dot + n, acc_t(0));
        std::fill(nf, nf + n, acc_t(0));
        for (int64_t c = 0; c < C; ++c) {
          const scalar_t* x = f + (b * C + c) * HW + p0;
          for (int64_t p = 0; p < n; ++p) nf[p] += static_cast<acc_t>(x[p]) * static_cast<acc_t>(x[p]);
          for_each_run(runs[b], p0, p0 + n, [&](int64_t first, int64_t last, int64_t k) {
            if (k < 0) return;
            const acc_t centre = cp[(b * K + k) * C + c];
            for (int64_t p = first - p0; p < last - p0; ++p) dot[p] += static_cast<acc_t>(x[p]) * centre;
          });
        }
        for (int64_t p = 0; p < n; ++p) fn_p[b * HW + p0 + p] = std::sqrt(nf[p]);
        for_each_run(runs[b], p0, p0 + n, [&](int64_t first, int64_t last, int64_t k) {
          if (k < 0) return;
          for (int64_t p = first; p < last; ++p)
            cos_p[b * HW + p] = clamped_cosine(dot[p - p0], fn_p[b * HW + p], cnorm[b * K + k], static_cast<acc_t>(eps));
        });
      }
    });
  });
  return {cos, fnorm};
}

// Gradients w.r.t. feats and centroids from the gradient of the cos map, using the forward's
// cos map and feature norms (so the backward reads the features once).
// With `counts` (the centroids' own class counts, op schema in idd_ops.cpp), grad_f also carries
// the path through the centroids.
std::tuple<at::Tensor, at::Tensor> cosine_backward(const at::Tensor& grad_in, const at::Tensor& feats_in,
                                                   const at::Tensor& centroids_in, const std::vector<LabelRuns>& runs,
                                                   const at::Tensor& cos_in, const at::Tensor& fnorm_in, double eps,
                                                   const std::optional<at::Tensor>& counts = std::nullopt) {
  const CosineBackwardTensors t = cosine_backward_tensors(grad_in, feats_in, centroids_in, cos_in, fnorm_in);
  const at::Tensor &feats = t.feats, &cent = t.cent, &grad = t.grad, &cosv = t.cos, &fnorm = t.fnorm;
  const at::Tensor &grad_f = t.grad_f, &grad_c = t.grad_c;
  const int64_t B = feats.size(0), C = feats.size(1), HW = feats.size(2) * feats.size(3), K = centroids_in.size(1);
  if (feats.numel() == 0) return {grad_f, grad_c.to(centroids_in.scalar_type())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    const acc_t* cp = cent.const_data_ptr<acc_t>();
    const auto cnorm = centroid_norms(cp, B * K, C);
    // Per pixel: grad_f = a * c_y + bf * f; contribution to grad c_y = a * f + bc * c_y.
    std::vector<acc_t> a(B * HW, 0), bf(B * HW, 0), bc_sum(B * K, 0);
    for (int64_t b = 0; b < B; ++b) {
      for_each_run(runs[b], 0, HW, [&](int64_t first, int64_t last, int64_t k) {
        if (k < 0) return;
        for (int64_t e = b * HW + first; e < b * HW + last; ++e) {
          const acc_t g = grad.const_data_ptr<acc_t>()[e];
          const CosineGrad<acc_t> cg = clamped_cosine_grad(cosv.const_data_ptr<acc_t>()[e],
                                                           fnorm.const_data_ptr<acc_t>()[e], cnorm[b * K + k],
                                                           static_cast<acc_t>(eps));
          a[e] = g * cg.alpha, bf[e] = g * cg.beta_f;
          bc_sum[b * K + k] += g * cg.beta_c;
        }
      });
    }
    scalar_t* gf = grad_f.data_ptr<scalar_t>();
    acc_t* gc = grad_c.data_ptr<acc_t>();
    const at::Tensor counts_c = counts ? counts->contiguous() : at::Tensor();
    const int64_t* n = counts ? counts_c.const_data_ptr<int64_t>() : nullptr;
    at::parallel_for(0, B * C, 4, [&](int64_t r0, int64_t r1) {
      std::vector<acc_t> sums(K);
      for (int64_t row = r0; row < r1; ++row) {
        // (b, c) is one row of the feature map
        const int64_t b = row / C, c = row % C;
        const scalar_t* x = f + row * HW;
        const acc_t* ab = a.data() + b * HW;
        const acc_t* bb = bf.data() + b * HW;
        scalar_t* out = gf + row * HW;
        std::fill(sums.begin(), sums.end(), acc_t(0));
        for_each_run(runs[b], 0, HW, [&](int64_t first, int64_t last, int64_t k) {
          // ignored pixels have a = bf = 0: their gradient is 0 * f, as for every pixel
          const acc_t centre = k >= 0 ? cp[(b * K + k) * C + c] : acc_t(0);
          // eight partial sums: one chain of adds would bind the loop to the add latency
          acc_t part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
          int64_t p = first;
          for (; p + 8 <= last; p += 8) {
            for (int u = 0; u < 8; ++u) {
              const acc_t v = static_cast<acc_t>(x[p + u]);
              out[p + u] = static_cast<scalar_t>(ab[p + u] * centre + bb[p + u] * v);
              part[u] += ab[p + u] * v;
            }
          }
          acc_t sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
          for (; p < last; ++p) {
            const acc_t v = static_cast<acc_t>(x[p]);
            out[p] = static_cast<scalar_t>(ab[p] * centre + bb[p] * v);
            sum += ab[p] * v;
          }
          if (k >= 0) sums[k] += sum;
        });
        for (int64_t k = 0; k < K; ++k) gc[(b * K + k) * C + c] = sums[k] + bc_sum[b * K + k] * cp[(b * K + k) * C + c];
        if (n == nullptr) continue;
        // own centroids: the row again, each pixel with its share of its centroid's gradient
        // (written whole, not added to the rounded value above)
        for_each_run(runs[b], 0, HW, [&](int64_t first, int64_t last, int64_t k) {
          if (k < 0) return;
          const acc_t centre = cp[(b * K + k) * C + c];
          const acc_t share = gc[(b * K + k) * C + c] / static_cast<acc_t>(std::max<int64_t>(n[b * K + k], 1));
          for (int64_t p = first; p < last; ++p)
            out[p] = static_cast<scalar_t>(ab[p] * centre + bb[p] * static_cast<acc_t>(x[p]) + share);
        });
      }
    });
  });
  return {grad_f, grad_c.to(centroids_in.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_kernel(const at::Tensor& feats, const at::Tensor& centroids,
                                                                const at::Tensor& labels, int64_t ignore_index,
                                                                double eps) {
  check_pixel_centroid_cosine_inputs(feats, centroids, labels, eps);
  return cosine_forward(
      feats, centroids, label_runs_per_image(labels, feats.size(2), feats.size(3), centroids.size(1), ignore_index), eps);
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_backward_kernel(
    const at::Tensor& grad, const at::Tensor& feats, const at::Tensor& centroids, const at::Tensor& labels,
    const at::Tensor& cos, const at::Tensor& fnorm, int64_t ignore_index, double eps) {
  check_pixel_centroid_cosine_backward_inputs(grad, feats, centroids, labels, cos, fnorm, eps);
  const auto runs = label_runs_per_image(labels, feats.size(2), feats.size(3), centroids.size(1), ignore_index);
  return cosine_backward(grad, feats, centroids, runs, cos, fnorm, eps);
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_kernel(const at::Tensor& feats,
                                                                      const at::Tensor& centroids,
                                                                      const at::Tensor& slots, double eps,
                                                                      const std::optional<at::Tensor>& counts) {
  check_pixel_centroid_cosine_slots_inputs(feats, centroids, slots, eps, counts);
  return cosine_forward(feats, centroids, slot_runs_per_image(slots, centroids.size(1)), eps);
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_backward_kernel(
    const at::Tensor& grad, const at::Tensor& feats, const at::Tensor& centroids, const at::Tensor& slots,
    const at::Tensor& cos, const at::Tensor& fnorm, double eps, const std::optional<at::Tensor>& counts) {
  check_pixel_centroid_cosine_slots_backward_inputs(grad, feats, centroids, slots, cos, fnorm, eps, counts);
  return cosine_backward(grad, feats, centroids, slot_runs_per_image(slots, centroids.size(1)), cos, fnorm, eps,
                         counts);
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("pixel_centroid_cosine", &pixel_centroid_cosine_kernel);
  m.impl("_pixel_centroid_cosine_backward", &pixel_centroid_cosine_backward_kernel);
  m.impl("_pixel_centroid_cosine_slots", &pixel_centroid_cosine_slots_kernel);
  m.impl("_pixel_centroid_cosine_slots_backward", &pixel_centroid_cosine_slots_backward_kernel);
}

}  // namespace idd_ops
