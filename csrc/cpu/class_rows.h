#pragma once
// Row kernels of the CPU class passes over NCHW features [B, C, HW], shared by class_centroids
// (means) and class_sums (plain sums, written in float64), and by their gradients (`cnt` holds
// the class sizes of means; nullptr for sums). float32
// rows go through the chunk kernels (label_chunks.h), 8 feature rows at a time; the other
// dtypes through the per-row run kernels (label_runs.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels/class_centroids.h"
#include "label_chunks.h"
#include "label_runs.h"

namespace idd_ops {
namespace class_rows {

// A class's sum divided by its size n (0 for an absent class); n < 0 means "sums, not means".
template <typename acc_t>
inline acc_t per_class(acc_t sum, int64_t n) {
  if (n < 0) return sum;
  return n > 0 ? sum / static_cast<acc_t>(n) : acc_t(0);
}

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

inline void count_pixels(const std::vector<LabelChunks>& chunks, int64_t K, int64_t* cnt) {
  for (size_t b = 0; b < chunks.size(); ++b)
    for (const int32_t s : chunks[b].slot)
      if (s < K) ++cnt[b * K + s];
}

inline void count_pixels(const std::vector<LabelRuns>& runs, int64_t K, int64_t* cnt) {
  for (size_t b = 0; b < runs.size(); ++b)
    for (int64_t r = 0; r < runs[b].size(); ++r)
      if (runs[b].cls[r] >= 0) cnt[b * K + runs[b].cls[r]] += runs[b].start[r + 1] - runs[b].start[r];
}

// The value a class pass subtracts from a row of values x[i * stride] (i < hw) before summing it
// (add_chunk_sums_8rows for NCHW rows, add_pixel_blocks for channels_last channels): the row's
// first value where its first values sit far from 0 next to their spread (a common offset, as
// ReLU features share: sums of x - pivot then round at the spread's scale, not the offset's), else
// 0 (values around 0 sum best as they are). Plain sums add count * pivot back in float64, which
// holds it exactly enough.
template <typename acc_t, typename scalar_t>
inline acc_t row_pivot(const scalar_t* x, int64_t hw, int64_t stride = 1) {
  const int64_t n = std::min<int64_t>(hw, kRows);
  acc_t lo = static_cast<acc_t>(x[0]), hi = lo, sum = 0;
  for (int64_t i = 0; i < n; ++i) {
    const acc_t v = static_cast<acc_t>(x[i * stride]);
    lo = std::min(lo, v), hi = std::max(hi, v), sum += v;
  }
  return std::abs(sum / static_cast<acc_t>(n)) > acc_t(8) * (hi - lo) ? static_cast<acc_t>(x[0]) : acc_t(0);
}

// Per-class means (`means`: out_t float32, 0 for an absent class) or sums (out_t float64) [B, K, C]
// of float32 features [B, C, HW] with class sizes cnt [B, K], through the chunk kernel.
template <typename out_t>
void centroids_by_chunks(const float* f, const std::vector<LabelChunks>& chunks, const int64_t* cnt, bool means,
                         int64_t C, int64_t HW, int64_t K, out_t* out) {
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
      for (int64_t r = 0; r < kRows; ++r) pivot[r] = row_pivot<float>(x + r * HW, HW);
      const LabelChunks& lc = chunks[b];
      add_sums(x, HW, lc.slot.data(), lc.spans.data(), static_cast<int64_t>(lc.spans.size()),
               static_cast<int32_t>(K), pivot, sums.data());
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = cnt[b * K + k];
        for (int64_t r = 0; r < rows; ++r) {
          const float s = sums[k * kRows + r];
          out[(b * K + k) * C + c0 + r] =
              means ? static_cast<out_t>(n > 0 ? pivot[r] + s / static_cast<float>(n) : 0.f)
                    : static_cast<out_t>(s) + static_cast<out_t>(n) * static_cast<out_t>(pivot[r]);
        }
      }
    }
  });
}

// Means (`means`) or sums [B, K, C] of features [B, C, HW] of any dtype with class sizes
// cnt [B, K], through the run kernel.
template <typename scalar_t, typename acc_t, typename out_t>
void centroids_by_runs(const scalar_t* f, const std::vector<LabelRuns>& runs, const int64_t* cnt, bool means,
                       int64_t C, int64_t HW, int64_t K, out_t* out) {
  const auto add_runs = IDD_CPU_KERNEL(add_run_sums<scalar_t, acc_t>);
  at::parallel_for(0, static_cast<int64_t>(runs.size()) * C, kRowGrain, [&](int64_t row0, int64_t row1) {
    std::vector<acc_t> sums(K);
    for (int64_t row = row0; row < row1; ++row) {
      // (b, c) is one row of the feature map
      const int64_t b = row / C, c = row % C;
      const LabelRuns& rb = runs[b];
      std::fill(sums.begin(), sums.end(), acc_t(0));
      add_runs(f + row * HW, rb.start.data(), rb.cls.data(), rb.size(), sums.data());
      for (int64_t k = 0; k < K; ++k)
        out[(b * K + k) * C + c] = static_cast<out_t>(means ? per_class(sums[k], cnt[b * K + k]) : sums[k]);
    }
  });
}

// grad [B, C, HW] of float32 features, through the chunk kernel.
inline void grad_by_chunks(const float* gc, const std::vector<LabelChunks>& chunks, const int64_t* cnt, int64_t C,
                    int64_t HW, int64_t K, float* grad) {
  const RowGroups groups(C);
  const auto write_values = IDD_CPU_KERNEL(write_chunk_values_8rows);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()) * groups.per_image, 1, [&](int64_t g0, int64_t g1) {
    std::vector<float> values((K + 1) * kRows, 0.f);  // slot K, the ignored pixels, keeps 0
    std::vector<float> pad;
    for (int64_t g = g0; g < g1; ++g) {
      const int64_t b = groups.image(g), c0 = groups.first(g), rows = groups.rows(g);
      for (int64_t k = 0; k < K; ++k) {
        const int64_t n = cnt ? cnt[b * K + k] : -1;
        for (int64_t r = 0; r < kRows; ++r)
          values[k * kRows + r] = r < rows ? per_class(gc[(b * K + k) * C + c0 + r], n) : 0.f;
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
        const int64_t n = cnt ? cnt[b * K + k] : -1;
        value[k] = static_cast<scalar_t>(per_class(gc[(b * K + k) * C + c], n));
      }
      scalar_t* out = g + row * HW;
      const LabelRuns& rb = runs[b];
      for (int64_t r = 0; r < rb.size(); ++r)
        std::fill(out + rb.start[r], out + rb.start[r + 1], rb.cls[r] >= 0 ? value[rb.cls[r]] : scalar_t(0));
    }
  });
}

}  // namespace class_rows
}  // namespace idd_ops
