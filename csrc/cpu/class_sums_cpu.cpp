// Class slots, per-class feature sums and their gradient on the CPU (_label_slots, class_sums,
// class_sums_pair, _class_sums_backward). NCHW features go through the row kernels of
// class_centroids (class_rows.h); channels_last features are read in place, pixel by pixel.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../common/checks.h"
#include "class_rows.h"

namespace idd_ops {
namespace {
// declarations, not a using-directive: the file is compiled in one unit with its group
using class_rows::centroids_by_chunks;
using class_rows::centroids_by_runs;
using class_rows::grad_by_chunks;
using class_rows::grad_by_runs;
using class_rows::row_pivot;

at::Tensor label_slots_kernel(const at::Tensor& labels_in, int64_t height, int64_t width, int64_t num_classes,
                              int64_t ignore_index) {
  check_label_slots_inputs(labels_in, height, width, num_classes);
  const at::Tensor labels = dispatchable_labels(labels_in);
  const int64_t HW = height * width;
  at::Tensor slots = at::empty({labels.size(0), height, width}, labels.options().dtype(at::kShort));
  if (slots.numel() == 0) return slots;
  int16_t* out = slots.data_ptr<int16_t>();
  at::parallel_for(0, labels.size(0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const std::vector<int32_t> s = label_slots(labels, b, height, width, num_classes, ignore_index);
      std::copy(s.begin(), s.end(), out + b * HW);
    }
  });
  return slots;
}

// Slots of image b as int32, checked against num_classes (a direct call of the op may pass
// slots made for another K).
std::vector<int32_t> image_slots(const int16_t* slots, int64_t b, int64_t HW, int64_t num_classes) {
  std::vector<int32_t> s(slots + b * HW, slots + (b + 1) * HW);
  for (const int32_t k : s)
    TORCH_CHECK_VALUE(k >= -1 && k < num_classes, "slots: value ", k, " is outside [-1, num_classes=", num_classes,
                      ")");
  return s;
}

// Runs or chunks of every image's slots, in parallel (one image per task).
template <typename Build>
auto per_image_slots(const at::Tensor& slots, int64_t num_classes, Build build) {
  const int64_t B = slots.size(0), HW = slots.size(1) * slots.size(2);
  std::vector<decltype(build(std::vector<int32_t>{}))> out(B);
  const int16_t* s = slots.const_data_ptr<int16_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) out[b] = build(image_slots(s, b, HW, num_classes));
  });
  return out;
}

// Channels per task of the channels_last pass: as many as keep the task's table (K rows of them)
// within kTableBytes, so it stays in L2, in multiples of 64, at least 64 and at most C. Wide
// blocks matter: pixels lie C values apart, and a narrow block would touch a new page every
// pixel for a few cache lines (measured 2.1x slower at 64 channels of C = 2048 than NCHW).
constexpr int64_t kTableBytes = 256 * 1024;

int64_t channel_block(int64_t C, int64_t K, int64_t acc_size) {
  const int64_t fit = kTableBytes / (std::max<int64_t>(K, 1) * acc_size) / 64 * 64;
  return std::min(C, std::max<int64_t>(64, fit));
}

// float64 sums [B, K, C] of channels_last features x [B, HW, C] in memory with class sizes
// cnt [B, K]: one task per (image, block of channels). Each pixel adds its block, less the
// channel pivots, to its class's row of an acc_t table (add_pixel_blocks); count * pivot joins
// each row when it is written out in float64. Sums of x - pivot round at the classes' spread,
// as the NCHW chunk kernel's do, and a pixel costs one pass over its block however short its
// class's runs are.
template <typename scalar_t, typename acc_t>
void sums_channels_last(const scalar_t* x, const int16_t* slot, const int64_t* cnt, int64_t B, int64_t C, int64_t HW,
                        int64_t K, double* out) {
  const int64_t block = channel_block(C, K, sizeof(acc_t)), tiles = (C + block - 1) / block;
  const auto add_blocks = IDD_CPU_KERNEL(add_pixel_blocks<scalar_t, acc_t>);
  at::parallel_for(0, B * tiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> table(K * block), pivot(block);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t b = t / tiles, c0 = (t % tiles) * block, n = std::min(block, C - c0);
      const int16_t* s = slot + b * HW;
      const scalar_t* img = x + b * HW * C + c0;
      if (HW == 0) continue;
      for (int64_t c = 0; c < n; ++c) pivot[c] = row_pivot<acc_t>(img + c, HW, C);
      std::fill(table.begin(), table.end(), acc_t(0));
      add_blocks(img, C, HW, s, n, pivot.data(), table.data());
      for (int64_t k = 0; k < K; ++k) {
        const double count = static_cast<double>(cnt[b * K + k]);
        const acc_t* row = table.data() + k * n;
        double* dst = out + (b * K + k) * C + c0;
        for (int64_t c = 0; c < n; ++c) dst[c] = count > 0 ? static_cast<double>(row[c]) + count * pivot[c] : 0.0;
      }
    }
  });
}

void count_slots(const at::Tensor& slots, int64_t K, int64_t* cnt) {
  const int64_t B = slots.size(0), HW = slots.size(1) * slots.size(2);
  const int16_t* s = slots.const_data_ptr<int16_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (const int32_t k : image_slots(s, b, HW, K))
        if (k >= 0) ++cnt[b * K + k];
  });
}

std::tuple<at::Tensor, at::Tensor> class_sums_kernel(const at::Tensor& feats_in, const at::Tensor& slots_in,
                                                     int64_t num_classes) {
  check_class_sums_inputs(feats_in, slots_in, num_classes);
  const bool last = channels_last_layout(feats_in);
  // NCHW and channels_last are read in place; any other layout pays one copy.
  const at::Tensor feats = last ? feats_in : feats_in.contiguous();
  const at::Tensor slots = slots_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), HW = feats.size(2) * feats.size(3), K = num_classes;
  at::Tensor sums = at::zeros({B, K, C}, feats.options().dtype(at::kDouble));
  at::Tensor counts = at::zeros({B, K}, feats.options().dtype(at::kLong));
  if (B == 0 || HW == 0) return {sums, counts};
  int64_t* cnt = counts.data_ptr<int64_t>();
  count_slots(slots, K, cnt);
  if (C == 0) return {sums, counts};
  if (!last && feats.scalar_type() == at::kFloat) {
    const auto chunks = per_image_slots(slots, K, [&](std::vector<int32_t> s) { return chunks_of_slots(s, K); });
    centroids_by_chunks(feats.const_data_ptr<float>(), chunks, cnt, false, C, HW, K, sums.data_ptr<double>());
    return {sums, counts};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "class_sums_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (last) {
      sums_channels_last<scalar_t, acc_t>(feats.const_data_ptr<scalar_t>(), slots.const_data_ptr<int16_t>(), cnt, B,
                                          C, HW, K, sums.data_ptr<double>());
    } else {
      const auto runs = per_image_slots(slots, K, [](std::vector<int32_t> s) {
        return runs_of_slots(s.data(), static_cast<int64_t>(s.size()));
      });
      centroids_by_runs<scalar_t, acc_t>(feats.const_data_ptr<scalar_t>(), runs, cnt, false, C, HW, K,
                                         sums.data_ptr<double>());
    }
  });
  return {sums, counts};
}

// Two class passes: on the CPU each already fills every core, so nothing is gained by merging.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> class_sums_pair_kernel(const at::Tensor& feats_a,
                                                                                  const at::Tensor& slots_a,
                                                                                  const at::Tensor& feats_b,
                                                                                  const at::Tensor& slots_b,
                                                                                  int64_t num_classes) {
  auto [sa, na] = class_sums_kernel(feats_a, slots_a, num_classes);
  auto [sb, nb] = class_sums_kernel(feats_b, slots_b, num_classes);
  return {sa, na, sb, nb};
}

// grad [B, HW, C] (channels_last memory): each pixel's row is its class's row of grad_sums.
template <typename scalar_t, typename acc_t>
void grad_channels_last(const acc_t* gs, const int16_t* slot, int64_t B, int64_t C, int64_t HW, int64_t K,
                        scalar_t* grad) {
  at::parallel_for(0, B * HW, std::max<int64_t>(1, 4096 / std::max<int64_t>(C, 1)), [&](int64_t e0, int64_t e1) {
    for (int64_t e = e0; e < e1; ++e) {
      // (b, p) is one pixel of the output
      const int64_t b = e / HW, k = slot[e];
      scalar_t* out = grad + e * C;
      if (k < 0) {
        std::fill(out, out + C, scalar_t(0));
      } else {
        const acc_t* row = gs + (b * K + k) * C;
        for (int64_t c = 0; c < C; ++c) out[c] = static_cast<scalar_t>(row[c]);
      }
    }
  });
}

at::Tensor class_sums_backward_kernel(const at::Tensor& grad_sums_in, const at::Tensor& slots_in, at::ScalarType dtype,
                                      bool channels_last) {
  check_class_sums_backward_inputs(grad_sums_in, slots_in, dtype);
  const at::Tensor grad_sums = grad_sums_in.to(acc_dtype(dtype)).contiguous();
  const at::Tensor slots = slots_in.contiguous();
  const int64_t B = grad_sums.size(0), K = grad_sums.size(1), C = grad_sums.size(2);
  const int64_t H = slots.size(1), W = slots.size(2), HW = H * W;
  const auto format = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor grad = at::empty({B, C, H, W}, grad_sums.options().dtype(dtype).memory_format(format));
  if (grad.numel() == 0) return grad;
  if (!channels_last && dtype == at::kFloat) {
    const auto chunks = per_image_slots(slots, K, [&](std::vector<int32_t> s) { return chunks_of_slots(s, K); });
    grad_by_chunks(grad_sums.const_data_ptr<float>(), chunks, nullptr, C, HW, K, grad.data_ptr<float>());
    return grad;
  }
  if (channels_last) {  // checked here: the channels_last loop reads the slots directly
    const int16_t* s = slots.const_data_ptr<int16_t>();
    at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) image_slots(s, b, HW, K);
    });
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "class_sums_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (channels_last) {
      grad_channels_last(grad_sums.const_data_ptr<acc_t>(), slots.const_data_ptr<int16_t>(), B, C, HW, K,
                         grad.data_ptr<scalar_t>());
    } else {
      const auto runs = per_image_slots(slots, K, [](std::vector<int32_t> s) {
        return runs_of_slots(s.data(), static_cast<int64_t>(s.size()));
      });
      grad_by_runs(grad_sums.const_data_ptr<acc_t>(), runs, nullptr, C, HW, K, grad.data_ptr<scalar_t>());
    }
  });
  return grad;
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("_label_slots", &label_slots_kernel);
  m.impl("class_sums", &class_sums_kernel);
  m.impl("class_sums_pair", &class_sums_pair_kernel);
  m.impl("_class_sums_backward", &class_sums_backward_kernel);
}

}  // namespace idd_ops
