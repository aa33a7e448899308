#pragma once
// Labels of one image at feature resolution, stored as runs of equal class along the
// flattened pixel index. Segmentation labels are piecewise constant, so a feature row is
// reduced (or written) one contiguous span at a time: vectorised, and without the
// store-to-load dependency that a per-pixel `acc[label[p]] += x[p]` loop suffers.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <vector>

#include "../common/label_index.h"

namespace idd_ops {

struct LabelRuns {
  std::vector<int64_t> start;  // start[r] .. start[r + 1] is run r; start.back() == H * W
  std::vector<int64_t> cls;    // class of run r, or -1 for ignored pixels
  int64_t size() const { return static_cast<int64_t>(cls.size()); }
};

// uint16/32/64 are outside AT_DISPATCH_INTEGRAL_TYPES: those rare dtypes are widened once.
inline at::Tensor dispatchable_labels(const at::Tensor& labels) {
  const auto t = labels.scalar_type();
  return (t == at::kUInt16 || t == at::kUInt32 || t == at::kUInt64) ? labels.to(at::kLong) : labels;
}

// Class slot of every pixel of image b of `labels` [B, Hy, Wy] resized (nearest) to H x W:
// the class in [0, num_classes), or -1 for ignore_index. Labels outside [0, num_classes) that
// are not ignore_index raise a ValueError naming the value.
inline std::vector<int32_t> label_slots(const at::Tensor& labels, int64_t b, int64_t H, int64_t W,
                                        int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(num_classes < (int64_t{1} << 31) - 1, "num_classes: expected < 2^31 - 1, got ", num_classes);
  std::vector<int32_t> slot(H * W);
  const int64_t Hy = labels.size(1), Wy = labels.size(2);
  const auto st = labels.strides();
  AT_DISPATCH_INTEGRAL_TYPES(labels.scalar_type(), "label_slots", [&] {
    const scalar_t* img = labels.const_data_ptr<scalar_t>() + b * st[0];
    for (int64_t r = 0; r < H; ++r) {
      const scalar_t* line = img + nearest_source_index(r, Hy, H) * st[1];
      for (int64_t c = 0; c < W; ++c) {
        const int64_t raw = static_cast<int64_t>(line[nearest_source_index(c, Wy, W) * st[2]]);
        const int64_t k = class_slot(raw, num_classes, ignore_index);
        TORCH_CHECK_VALUE(k >= 0 || raw == ignore_index, "labels: value ", raw,
                          " is outside [0, num_classes=", num_classes,
                          ") and is not ignore_index=", ignore_index);
        slot[r * W + c] = static_cast<int32_t>(k);
      }
    }
  });
  return slot;
}

// Runs of n pixel slots (class, or -1 for ignored pixels); slot_t is int32_t or int16_t.
template <typename slot_t>
inline LabelRuns runs_of_slots(const slot_t* slot, int64_t n) {
  LabelRuns runs;
  for (int64_t p = 0; p < n; ++p) {
    if (p == 0 || slot[p] != slot[p - 1]) {
      runs.start.push_back(p);
      runs.cls.push_back(slot[p]);
    }
  }
  runs.start.push_back(n);
  return runs;
}

// Runs of image b of `labels`, checked as label_slots checks them.
inline LabelRuns label_runs(const at::Tensor& labels, int64_t b, int64_t H, int64_t W,
                            int64_t num_classes, int64_t ignore_index) {
  const std::vector<int32_t> slot = label_slots(labels, b, H, W, num_classes, ignore_index);
  return runs_of_slots(slot.data(), H * W);
}

// build(labels, b) for every image b of `labels_in` (uint dtypes widened once), in parallel
// (one image per task).
template <typename Build>
inline auto per_image(const at::Tensor& labels_in, Build build) {
  const at::Tensor labels = dispatchable_labels(labels_in);
  std::vector<decltype(build(labels, int64_t{0}))> out(labels.size(0));
  at::parallel_for(0, labels.size(0), 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) out[b] = build(labels, b);
  });
  return out;
}

// Runs of every image, built in parallel (one image per task).
inline std::vector<LabelRuns> label_runs_per_image(const at::Tensor& labels, int64_t H, int64_t W,
                                                   int64_t num_classes, int64_t ignore_index) {
  return per_image(labels,
                   [&](const at::Tensor& l, int64_t b) { return label_runs(l, b, H, W, num_classes, ignore_index); });
}

// A slot outside [-1, num_classes) raises a ValueError naming `slots` (image b's n slots).
inline void check_slot_values(const int16_t* s, int64_t n, int64_t b, int64_t num_classes) {
  for (int64_t p = 0; p < n; ++p)
    TORCH_CHECK_VALUE(s[p] >= -1 && s[p] < num_classes, "slots: value ", s[p], " at image ", b,
                      " is outside [-1, num_classes=", num_classes, ")");
}

// Runs of every image of a class-slot map [B, H, W] int16 (from _label_slots). A slot outside
// [-1, num_classes) raises a ValueError naming `slots`: a direct call of an op may pass slots
// made for another K. One thread: the scan reads 2 bytes a pixel (about 0.1 ms at B=8, 64 x 128),
// less than a parallel region costs on a busy machine (measured up to 12 ms at load 9 on 2 cores).
inline std::vector<LabelRuns> slot_runs_per_image(const at::Tensor& slots_in, int64_t num_classes) {
  const at::Tensor slots = slots_in.contiguous();
  const int64_t B = slots.size(0), HW = slots.size(1) * slots.size(2);
  const int16_t* all = slots.const_data_ptr<int16_t>();
  std::vector<LabelRuns> out(B);
  for (int64_t b = 0; b < B; ++b) {
    check_slot_values(all + b * HW, HW, b, num_classes);
    out[b] = runs_of_slots(all + b * HW, HW);
  }
  return out;
}

}  // namespace idd_ops
