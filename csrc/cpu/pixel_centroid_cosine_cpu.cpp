// Per-pixel cosine similarity to the pixel's class centroid (the IFVD map), forward and
// backward, on the CPU, with the pixel classes read from labels (pixel_centroid_cosine) or from
// a class-slot map (_pixel_centroid_cosine_slots). Ignored pixels score 1 and carry no gradient.
// float32 features go through the chunk kernels (kernels/pixel_centroid_cosine.h), 8 feature rows
// at a time; the other dtypes through the per-row run loops below.
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
#include "class_rows.h"
#include "kernels/pixel_centroid_cosine.h"
#include "label_chunks.h"
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

// The forward's outputs: cos map [B, H, W] (1 where nothing writes: ignored pixels) and feature
// norms [B, H, W], both in the accumulation dtype.
std::tuple<at::Tensor, at::Tensor> cosine_outputs(const at::Tensor& feats, at::ScalarType acc) {
  const int64_t B = feats.size(0), H = feats.size(2), W = feats.size(3);
  return {at::ones({B, H, W}, feats.options().dtype(acc)), at::zeros({B, H, W}, feats.options().dtype(acc))};
}

// Returns (cos map, feature norms) for the pixel classes given as runs (built from labels or from
// a slot map: the only difference of the two ops), for features of any dtype.
std::tuple<at::Tensor, at::Tensor> cosine_forward(const at::Tensor& feats_in, const at::Tensor& centroids_in,
                                                  const std::vector<LabelRuns>& runs, double eps) {
  const int64_t K = centroids_in.size(1);
  const at::Tensor feats = feats_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), HW = feats.size(2) * feats.size(3);
  const auto acc = acc_dtype(feats.scalar_type());
  const at::Tensor cent = centroids_in.to(acc).contiguous();
  auto [cos, fnorm] = cosine_outputs(feats, acc);
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

// The same for float32 features through the chunk kernel: a task is a tile of an image's pixels
// (a multiple of 8, so its chunks are whole), walking the image's row groups of 8.
std::tuple<at::Tensor, at::Tensor> cosine_forward_chunks(const at::Tensor& feats_in, const at::Tensor& centroids_in,
                                                         const std::vector<LabelChunks>& chunks, double eps) {
  using class_rows::kRows;
  const int64_t K = centroids_in.size(1);
  const at::Tensor feats = feats_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), HW = feats.size(2) * feats.size(3);
  const at::Tensor cent = centroids_in.to(at::kFloat).contiguous();
  auto [cos, fnorm] = cosine_outputs(feats, at::kFloat);
  if (cos.numel() == 0) return {cos, fnorm};
  const float* f = feats.const_data_ptr<float>();
  const float* cp = cent.const_data_ptr<float>();
  const auto cnorm = centroid_norms(cp, B * K, C);
  float* cos_p = cos.data_ptr<float>();
  float* fn_p = fnorm.data_ptr<float>();
  const class_rows::RowGroups groups(C);
  const int64_t tile = (pixel_tile(B, HW) + kRows - 1) / kRows * kRows, tiles = (HW + tile - 1) / tile;
  const int64_t full = HW / kRows * kRows;  // pixels of whole chunks
  const auto dots = IDD_CPU_KERNEL(cosine_dots_8rows);
  at::parallel_for(0, B * tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> dot(tile), nf(tile), centre((K + 1) * kRows), pad;
    std::vector<ChunkSpan> spans;
    for (int64_t task = t0; task < t1; ++task) {
      // (b, tile) is one run of pixels [p0, p1) of one image
      const int64_t b = task / tiles, p0 = (task % tiles) * tile, p1 = std::min(HW, p0 + tile);
      const LabelChunks& lc = chunks[b];
      spans = clip_spans(lc.spans, p0 / kRows, std::min(p1, full) / kRows);
      std::fill(dot.begin(), dot.end(), 0.f);
      std::fill(nf.begin(), nf.end(), 0.f);
      for (int64_t g = b * groups.per_image; g < (b + 1) * groups.per_image; ++g) {
        const int64_t c0 = groups.first(g), rows = groups.rows(g);
        const float* x = f + (b * C + c0) * HW;
        if (rows < kRows) {  // zero rows below the last channel, with zero centres; the tile's pixels copied
          if (pad.empty()) pad.assign(kRows * HW, 0.f);
          for (int64_t r = 0; r < rows; ++r) std::copy(x + r * HW + p0, x + r * HW + p1, pad.begin() + r * HW + p0);
          x = pad.data();
        }
        std::fill(centre.begin(), centre.end(), 0.f);  // the ignore slot's row stays 0
        for (int64_t k = 0; k < K; ++k)
          for (int64_t r = 0; r < rows; ++r) centre[k * kRows + r] = cp[(b * K + k) * C + c0 + r];
        dots(x, HW, lc.slot.data(), spans.data(), static_cast<int64_t>(spans.size()), std::max(p0, full), p1,
             centre.data(), dot.data(), nf.data(), p0);
      }
      for (int64_t p = p0; p < p1; ++p) {
        const float norm = std::sqrt(nf[p - p0]);
        fn_p[b * HW + p] = norm;
        const int32_t k = lc.slot[p];
        if (k < K) cos_p[b * HW + p] = clamped_cosine(dot[p - p0], norm, cnorm[b * K + k], static_cast<float>(eps));
      }
    }
  });
  return {cos, fnorm};
}

// Per pixel: grad_f = a * c_y + bf * f, and its share of grad c_y: a * f + bc * c_y, with bc
// summed per class (bc_sum [B, K]); a = bf = 0 at ignored pixels. visit(b, fn) calls
// fn(first, last, k) for the pixels [first, last) of class k of image b.
template <typename acc_t>
struct CosineFactors {
  std::vector<acc_t> a, bf, bc_sum;
};

template <typename acc_t, typename Visit>
CosineFactors<acc_t> cosine_factors(const CosineBackwardTensors& t, const std::vector<acc_t>& cnorm, int64_t B,
                                    int64_t HW, int64_t K, double eps, Visit visit) {
  CosineFactors<acc_t> out{std::vector<acc_t>(B * HW, 0), std::vector<acc_t>(B * HW, 0), std::vector<acc_t>(B * K, 0)};
  const acc_t* grad = t.grad.const_data_ptr<acc_t>();
  const acc_t* cosv = t.cos.const_data_ptr<acc_t>();
  const acc_t* fnorm = t.fnorm.const_data_ptr<acc_t>();
  for (int64_t b = 0; b < B; ++b) {
    visit(b, [&](int64_t first, int64_t last, int64_t k) {
      for (int64_t e = b * HW + first; e < b * HW + last; ++e) {
        const CosineGrad<acc_t> cg = clamped_cosine_grad(cosv[e], fnorm[e], cnorm[b * K + k], static_cast<acc_t>(eps));
        out.a[e] = grad[e] * cg.alpha, out.bf[e] = grad[e] * cg.beta_f;
        out.bc_sum[b * K + k] += grad[e] * cg.beta_c;
      }
    });
  }
  return out;
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
  const at::Tensor &feats = t.feats, &cent = t.cent, &grad_f = t.grad_f, &grad_c = t.grad_c;
  const int64_t B = feats.size(0), C = feats.size(1), HW = feats.size(2) * feats.size(3), K = centroids_in.size(1);
  if (feats.numel() == 0) return {grad_f, grad_c.to(centroids_in.scalar_type())};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* f = feats.const_data_ptr<scalar_t>();
    const acc_t* cp = cent.const_data_ptr<acc_t>();
    const auto cnorm = centroid_norms(cp, B * K, C);
    const auto fac = cosine_factors<acc_t>(t, cnorm, B, HW, K, eps, [&](int64_t b, auto fn) {
      for_each_run(runs[b], 0, HW, [&](int64_t first, int64_t last, int64_t k) {
        if (k >= 0) fn(first, last, k);
      });
    });
    const std::vector<acc_t>&a = fac.a, &bf = fac.bf, &bc_sum = fac.bc_sum;
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
          if (k < 0) {  // ignored: 0, not 0 * f, so that a NaN there stays out (METHOD.md 2)
            std::fill(out + first, out + last, scalar_t(0));
            return;
          }
          const acc_t centre = cp[(b * K + k) * C + c];
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
          sums[k] += sum;
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

// The same for float32 features through the chunk kernel: a task is one row group of 8 of an
// image. With `counts` the group's class sums come first (a pass that only reads), then one pass
// writes each pixel's gradient with its share of its centroid's: every gradient value is
// written once, and the second read of the 8 rows mostly hits the cache.
std::tuple<at::Tensor, at::Tensor> cosine_backward_chunks(const at::Tensor& grad_in, const at::Tensor& feats_in,
                                                          const at::Tensor& centroids_in,
                                                          const std::vector<LabelChunks>& chunks,
                                                          const at::Tensor& cos_in, const at::Tensor& fnorm_in,
                                                          double eps, const std::optional<at::Tensor>& counts) {
  using class_rows::kRows;
  const CosineBackwardTensors t = cosine_backward_tensors(grad_in, feats_in, centroids_in, cos_in, fnorm_in);
  const int64_t B = t.feats.size(0), C = t.feats.size(1), HW = t.feats.size(2) * t.feats.size(3);
  const int64_t K = centroids_in.size(1);
  if (t.feats.numel() == 0) return {t.grad_f, t.grad_c.to(centroids_in.scalar_type())};
  const float* f = t.feats.const_data_ptr<float>();
  const float* cp = t.cent.const_data_ptr<float>();
  const auto fac = cosine_factors<float>(t, centroid_norms(cp, B * K, C), B, HW, K, eps, [&](int64_t b, auto fn) {
    const int32_t* slot = chunks[b].slot.data();
    for (int64_t p = 0; p < HW; ++p)
      if (slot[p] < K) fn(p, p + 1, slot[p]);
  });
  float* gf = t.grad_f.data_ptr<float>();
  float* gc = t.grad_c.data_ptr<float>();
  const at::Tensor counts_c = counts ? counts->contiguous() : at::Tensor();
  const int64_t* n = counts ? counts_c.const_data_ptr<int64_t>() : nullptr;
  const class_rows::RowGroups groups(C);
  // each image's ignored pixels, whose gradient the vector loops form as 0 * f: set to 0 after
  // them, so that a NaN there stays out (METHOD.md 2)
  std::vector<std::vector<int32_t>> ignored(B);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t p = 0; p < HW; ++p)
      if (chunks[b].slot[p] >= K) ignored[b].push_back(static_cast<int32_t>(p));
  const auto grad_rows = IDD_CPU_KERNEL(cosine_grad_8rows);
  at::parallel_for(0, B * groups.per_image, 1, [&](int64_t g0, int64_t g1) {
    // 8 values per class slot, the ignore slot's (K) left 0
    std::vector<float> centre((K + 1) * kRows), sums((K + 1) * kRows), share((K + 1) * kRows), pad, pad_out;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = groups.image(g), c0 = groups.first(g), rows = groups.rows(g);
      const float* x = f + (b * C + c0) * HW;
      float* out = gf + (b * C + c0) * HW;
      if (rows < kRows) {  // zero rows below the last channel, written to a scratch block
        pad.assign(kRows * HW, 0.f);
        std::copy(x, x + rows * HW, pad.begin());
        x = pad.data();
        pad_out.resize(kRows * HW);
        out = pad_out.data();
      }
      std::fill(centre.begin(), centre.end(), 0.f);
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < rows; ++r) centre[k * kRows + r] = cp[(b * K + k) * C + c0 + r];
      std::fill(sums.begin(), sums.end(), 0.f);
      const LabelChunks& lc = chunks[b];
      const float *a = fac.a.data() + b * HW, *bf = fac.bf.data() + b * HW;
      const auto pass = [&](float* y, const float* sh, float* s) {
        grad_rows(x, y, HW, lc.slot.data(), lc.spans.data(), static_cast<int64_t>(lc.spans.size()), a, bf,
                  centre.data(), sh, s);
      };
      pass(n ? nullptr : out, nullptr, sums.data());
      for (int64_t k = 0; k < K; ++k)
        for (int64_t r = 0; r < rows; ++r)
          gc[(b * K + k) * C + c0 + r] = sums[k * kRows + r] + fac.bc_sum[b * K + k] * centre[k * kRows + r];
      if (n != nullptr) {  // own centroids: each pixel with its share of its centroid's gradient
        std::fill(share.begin(), share.end(), 0.f);
        for (int64_t k = 0; k < K; ++k)
          for (int64_t r = 0; r < rows; ++r)
            share[k * kRows + r] =
                gc[(b * K + k) * C + c0 + r] / static_cast<float>(std::max<int64_t>(n[b * K + k], 1));
        pass(out, share.data(), nullptr);
      }
      for (const int32_t p : ignored[b])
        for (int64_t r = 0; r < kRows; ++r) out[r * HW + p] = 0.f;
      if (rows < kRows) std::copy(pad_out.begin(), pad_out.begin() + rows * HW, gf + (b * C + c0) * HW);
    }
  });
  return {t.grad_f, t.grad_c.to(centroids_in.scalar_type())};
}

bool by_chunks(const at::Tensor& feats) { return feats.scalar_type() == at::kFloat; }

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_kernel(const at::Tensor& feats, const at::Tensor& centroids,
                                                                const at::Tensor& labels, int64_t ignore_index,
                                                                double eps) {
  check_pixel_centroid_cosine_inputs(feats, centroids, labels, eps);
  const int64_t H = feats.size(2), W = feats.size(3), K = centroids.size(1);
  if (by_chunks(feats))
    return cosine_forward_chunks(feats, centroids, label_chunks_per_image(labels, H, W, K, ignore_index), eps);
  return cosine_forward(feats, centroids, label_runs_per_image(labels, H, W, K, ignore_index), eps);
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_backward_kernel(
    const at::Tensor& grad, const at::Tensor& feats, const at::Tensor& centroids, const at::Tensor& labels,
    const at::Tensor& cos, const at::Tensor& fnorm, int64_t ignore_index, double eps) {
  check_pixel_centroid_cosine_backward_inputs(grad, feats, centroids, labels, cos, fnorm, eps);
  const int64_t H = feats.size(2), W = feats.size(3), K = centroids.size(1);
  if (by_chunks(feats))
    return cosine_backward_chunks(grad, feats, centroids, label_chunks_per_image(labels, H, W, K, ignore_index), cos,
                                  fnorm, eps, std::nullopt);
  return cosine_backward(grad, feats, centroids, label_runs_per_image(labels, H, W, K, ignore_index), cos, fnorm, eps);
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_kernel(const at::Tensor& feats,
                                                                      const at::Tensor& centroids,
                                                                      const at::Tensor& slots, double eps,
                                                                      const std::optional<at::Tensor>& counts) {
  check_pixel_centroid_cosine_slots_inputs(feats, centroids, slots, eps, counts);
  const int64_t K = centroids.size(1);
  if (by_chunks(feats)) return cosine_forward_chunks(feats, centroids, slot_chunks_per_image(slots, K), eps);
  return cosine_forward(feats, centroids, slot_runs_per_image(slots, K), eps);
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_backward_kernel(
    const at::Tensor& grad, const at::Tensor& feats, const at::Tensor& centroids, const at::Tensor& slots,
    const at::Tensor& cos, const at::Tensor& fnorm, double eps, const std::optional<at::Tensor>& counts) {
  check_pixel_centroid_cosine_slots_backward_inputs(grad, feats, centroids, slots, cos, fnorm, eps, counts);
  const int64_t K = centroids.size(1);
  if (by_chunks(feats))
    return cosine_backward_chunks(grad, feats, centroids, slot_chunks_per_image(slots, K), cos, fnorm, eps, counts);
  return cosine_backward(grad, feats, centroids, slot_runs_per_image(slots, K), cos, fnorm, eps, counts);
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
