// Per-image class centroids of a feature map, forward and backward, on the CPU.
// float32 features go through the chunk kernels (label_chunks.h), 8 feature rows at a time;
// the other dtypes through the per-row run kernels (label_runs.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common/checks.h"
#include "kernels/class_centroids.h"
#include "label_chunks.h"
#include "label_runs.h"

namespace idd_ops {
namespace {

// Rows per parallel task of the run kernels: one row is H*W values, so a few rows already
// amortise the task.
constexpr int64_t kRowGrain = 4;
// Feature rows per task of the chunk kernels: one vector register holds a pixel of each.
constexpr int64_t kRows = 8;

// Groups of kRows rows of an image; the last one is zero-padded when C is not a multiple of kRows.
struct RowGroups {
  int64_t C, per_image;
  explicit RowGroups(int64_t channels) : C(channels), per_image((channels + kRows - 1) / kRows) {}
  int64_t image(int64_t g) const { return g / per_image; }
  int64_t first(int64_t g) const { return (g % per_image) * kRows; }
  int64_t rows(int64_t g) const { return std::min(kRows, C - first(g)); }
};

void count_pixels(const std::vector<LabelChunks>& chunks, int64_t K, int64_t* cnt) {
  for (size_t b = 0; b < chunks.size(); ++b)
    for (const int32_t s : chunks[b].slot)
      if (s < K) ++cnt[b * K + s];
}

void count_pixels(const std::vector<LabelRuns>& runs, int64_t K, int64_t* cnt) {
  for (size_t b = 0; b < runs.size(); ++b)
    for (int64_t r = 0; r < runs[b].size(); ++r)
      if (runs[b].cls[r] >= 0) cnt[b * K + runs[b].cls[r]] += runs[b].start[r + 1] - runs[b].start[r];
}

// The value the chunk kernel subtracts from a row before summing it (add_chunk_sums_8rows):
// the row's first pixel where its first pixels sit far from 0 next to their spread (a common
// offset, as ReLU features share: sums of x - pivot then round at the spread's scale, not the
// offset's), else 0 (values around 0 sum best as they are, and then bit for bit as before).
float row_pivot(const float* x, int64_t hw) {
  const int64_t n = std::min<int64_t>(hw, kRows);
  float lo = x[0], hi = x[0], sum = 0.f;
  for (int64_t i = 0; i < n; ++i) lo = std::min(lo, x[i]), hi = std::max(hi, x[i]), sum += x[i];
  return std::abs(sum / static_cast<float>(n)) > 8.f * (hi - lo) ? x[0] : 0.f;
}

// centroids [B, K, C] of float32 features [B, C, HW], through the chunk kernel.
void centroids_by_chunks(const float* f, const std::vector<LabelChunks>& chunks, const int64_t* cnt, int64_t C,
                         int64_t HW, int64_t K, float* out) {
  const RowGroups groups(C);
  const auto add_sums = IDD_CPU_KERNEL(add_chunk_sums_8rows);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()) * groups.per_image, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> sums((K + 1) * kRows);
    std::vector<float> pad;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = groups.image(g), c0 = groups.first(g), rows = groups.rows(g);
      const float* x = f + (b * C + c0) * HW;
      if (rows < kRows) {
        pad.assign(kRows * HW, 0.f);
        std::copy(x, x + rows * HW, pad.begin());
        x = pad.data();
      }
      std::fill(sums.begin(), sums.end(), 0.f);
      float pivot[kRows];
      for (int64_t r = 0; r < kRows; ++r) pivot[r] = row_pivot(x + r * HW, HW);
      const LabelChunks& lc = chunks[b];
      add_sums(x, HW, lc.slot.data(), lc.spans.data(), static_cast<int64_t>(lc.spans.size()),
               static_cast<int32_t>(K), pivot, sums.data());
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = cnt[b * K + k];
        for (int64_t r = 0; r < rows; ++r)
          out[(b * K + k) * C + c0 + r] = n > 0 ? pivot[r] + sums[k * kRows + r] / static_cast<float>(n) : 0.f;
      }
    }
  });
}

// centroids [B, K, C] of features [B, C, HW] of any dtype, through the run kernel.
template <typename scalar_t, typename acc_t>
void centroids_by_runs(const scalar_t* f, const std::vector<LabelRuns>& runs, const int64_t* cnt, int64_t C,
                       int64_t HW, int64_t K, acc_t* out) {
  const auto add_runs = IDD_CPU_KERNEL(add_run_sums<scalar_t, acc_t>);
  at::parallel_for(0, static_cast<int64_t>(runs.size()) * C, kRowGrain, [&](int64_t row0, int64_t row1) {
    std::vector<acc_t> sums(K);
    for (int64_t row = row0; row < row1; ++row) {
      // (b, c) is one row of the feature map
      const int64_t b = row / C, c = row % C;
      const LabelRuns& rb = runs[b];
      std::fill(sums.begin(), sums.end(), acc_t(0));
      add_runs(f + row * HW, rb.start.data(), rb.cls.data(), rb.size(), sums.data());
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = cnt[b * K + k];
        out[(b * K + k) * C + c] = n > 0 ? sums[k] / static_cast<acc_t>(n) : acc_t(0);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> class_centroids_kernel(const at::Tensor& feats_in, const at::Tensor& labels,
                                                          int64_t num_classes, int64_t ignore_index) {
  check_class_centroids_inputs(feats_in, labels, num_classes);
  // Rows are streamed in NCHW order; other layouts pay one copy (documented).
  const at::Tensor feats = feats_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), H = feats.size(2), W = feats.size(3), HW = H * W;
  const int64_t K = num_classes;
  const auto acc = acc_dtype(feats.scalar_type());
  at::Tensor centroids = at::zeros({B, K, C}, feats.options().dtype(acc));
  at::Tensor counts = at::zeros({B, K}, feats.options().dtype(at::kLong));
  if (B == 0) return {centroids, counts};
  int64_t* cnt = counts.data_ptr<int64_t>();

  if (feats.scalar_type() == at::kFloat) {
    const auto chunks = label_chunks_per_image(labels, H, W, K, ignore_index);
    count_pixels(chunks, K, cnt);
    if (C > 0 && HW > 0)
      centroids_by_chunks(feats.const_data_ptr<float>(), chunks, cnt, C, HW, K, centroids.data_ptr<float>());
    return {centroids, counts};
  }
  const auto runs = label_runs_per_image(labels, H, W, K, ignore_index);
  count_pixels(runs, K, cnt);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "class_centroids_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    centroids_by_runs(feats.const_data_ptr<scalar_t>(), runs, cnt, C, HW, K, centroids.data_ptr<acc_t>());
  });
  return {centroids, counts};
}

// grad [B, C, HW] of float32 features, through the chunk kernel.
void grad_by_chunks(const float* gc, const std::vector<LabelChunks>& chunks, const int64_t* cnt, int64_t C,
                    int64_t HW, int64_t K, float* grad) {
  const RowGroups groups(C);
  const auto write_values = IDD_CPU_KERNEL(write_chunk_values_8rows);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()) * groups.per_image, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> values((K + 1) * kRows, 0.f);  // slot K, the ignored pixels, keeps 0
    std::vector<float> pad;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = groups.image(g), c0 = groups.first(g), rows = groups.rows(g);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = cnt[b * K + k];
        for (int64_t r = 0; r < kRows; ++r)
          values[k * kRows + r] = r < rows && n > 0 ? gc[(b * K + k) * C + c0 + r] / static_cast<float>(n) : 0.f;
      }
      float* y = grad + (b * C + c0) * HW;
      if (rows < kRows) pad.resize(kRows * HW);
      const LabelChunks& lc = chunks[b];
      write_values(rows < kRows ? pad.data() : y, HW, lc.slot.data(), lc.spans.data(),
                   static_cast<int64_t>(lc.spans.size()), values.data());
      if (rows < kRows) std::copy(pad.begin(), pad.begin() + rows * HW, y);
    }
  });
}

// grad [B, C, HW] of any dtype, through the runs.
template <typename scalar_t, typename acc_t>
void grad_by_runs(const acc_t* gc, const std::vector<LabelRuns>& runs, const int64_t* cnt, int64_t C, int64_t HW,
                  int64_t K, scalar_t* g) {
  at::parallel_for(0, static_cast<int64_t>(runs.size()) * C, kRowGrain, [&](int64_t row0, int64_t row1) {
    std::vector<scalar_t> value(K);
    for (int64_t row = row0; row < row1; ++row) {
      const int64_t b = row / C, c = row % C;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = cnt[b * K + k];
        value[k] = static_cast<scalar_t>(n > 0 ? gc[(b * K + k) * C + c] / static_cast<acc_t>(n) : acc_t(0));
      }
      scalar_t* out = g + row * HW;
      const LabelRuns& rb = runs[b];
      for (int64_t r = 0; r < rb.size(); ++r)
        std::fill(out + rb.start[r], out + rb.start[r + 1], rb.cls[r] >= 0 ? value[rb.cls[r]] : scalar_t(0));
    }
  });
}

// grad_feats[b, c, p] = grad_centroids[b, y_p, c] / counts[b, y_p], 0 where y_p is ignored.
at::Tensor class_centroids_backward_kernel(const at::Tensor& grad_centroids_in, const at::Tensor& labels,
                                           const at::Tensor& counts_in, int64_t height, int64_t width,
                                           at::ScalarType dtype, int64_t ignore_index) {
  check_class_centroids_backward_inputs(grad_centroids_in, labels, counts_in, height, width, dtype);
  const at::Tensor grad_centroids = grad_centroids_in.contiguous();
  const at::Tensor counts = counts_in.contiguous();
  const int64_t B = grad_centroids.size(0), K = grad_centroids.size(1), C = grad_centroids.size(2);
  const int64_t HW = height * width;
  at::Tensor grad = at::empty({B, C, height, width}, grad_centroids.options().dtype(dtype));
  if (grad.numel() == 0) return grad;
  const int64_t* cnt = counts.const_data_ptr<int64_t>();
  if (dtype == at::kFloat) {
    const auto chunks = label_chunks_per_image(labels, height, width, K, ignore_index);
    grad_by_chunks(grad_centroids.const_data_ptr<float>(), chunks, cnt, C, HW, K, grad.data_ptr<float>());
    return grad;
  }
  const auto runs = label_runs_per_image(labels, height, width, K, ignore_index);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_centroids_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    grad_by_runs(grad_centroids.const_data_ptr<acc_t>(), runs, cnt, C, HW, K, grad.data_ptr<scalar_t>());
  });
  return grad;
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("class_centroids", &class_centroids_kernel);
  m.impl("_class_centroids_backward", &class_centroids_backward_kernel);
}

}  // namespace idd_ops
