#pragma once
// Labels of one image at feature resolution as a walk over chunks of 8 consecutive pixels
// (along the flattened pixel index), for the float32 kernels that handle 8 feature rows at once
// (the centroid pass, kernels/class_centroids.inc; IFVD's cosine map,
// kernels/pixel_centroid_cosine.inc). Street-like label maps consist mostly of chunks
// whose 8 pixels share one class: consecutive such chunks of one class merge into one span,
// reduced with plain vector adds. A chunk of several classes is transposed to 8 pixel
// columns of 8 rows each, and every column goes to its class in one vector add, so per-pixel
// random labels cost about what long runs cost instead of one scalar step per pixel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "kernels/class_centroids.h"
#include "label_runs.h"

namespace idd_ops {

struct LabelChunks {
  std::vector<int32_t> slot;     // class slot of every pixel; num_classes for ignored pixels
  std::vector<ChunkSpan> spans;  // the H * W / 8 full chunks, in order; the rest are tail pixels
};

// Chunks of one image's pixel slots (class, or -1 for ignored pixels, stored as num_classes).
inline LabelChunks chunks_of_slots(std::vector<int32_t> slots, int64_t num_classes) {
  LabelChunks out;
  out.slot = std::move(slots);
  for (int32_t& s : out.slot)
    if (s < 0) s = static_cast<int32_t>(num_classes);
  const int32_t* slot = out.slot.data();
  const int64_t chunks = static_cast<int64_t>(out.slot.size()) / 8;
  for (int64_t j = 0; j < chunks; ++j) {
    const int32_t* l = slot + 8 * j;
    bool uniform = true;
    for (int i = 1; i < 8; ++i) uniform = uniform && l[i] == l[0];
    const int32_t s = uniform ? l[0] : kMixedChunk;
    if (uniform && !out.spans.empty() && out.spans.back().slot == s) {
      ++out.spans.back().count;
    } else {
      out.spans.push_back({s, static_cast<int32_t>(j), 1});
    }
  }
  return out;
}

// The spans of `spans` (one image's, in order) over chunks [j0, j1), clipped to that range: a
// span of several uniform chunks may cross either end.
inline std::vector<ChunkSpan> clip_spans(const std::vector<ChunkSpan>& spans, int64_t j0, int64_t j1) {
  std::vector<ChunkSpan> out;
  auto it = std::partition_point(spans.begin(), spans.end(),
                                 [&](const ChunkSpan& s) { return int64_t{s.chunk} + s.count <= j0; });
  for (; it != spans.end() && it->chunk < j1; ++it) {
    const int64_t first = std::max<int64_t>(it->chunk, j0);
    const int64_t last = std::min<int64_t>(int64_t{it->chunk} + it->count, j1);
    out.push_back({it->slot, static_cast<int32_t>(first), static_cast<int32_t>(last - first)});
  }
  return out;
}

// Chunks of image b of `labels`, checked as label_slots checks them.
inline LabelChunks label_chunks(const at::Tensor& labels, int64_t b, int64_t H, int64_t W, int64_t num_classes,
                                int64_t ignore_index) {
  return chunks_of_slots(label_slots(labels, b, H, W, num_classes, ignore_index), num_classes);
}

// Chunks of every image, built in parallel (one image per task).
inline std::vector<LabelChunks> label_chunks_per_image(const at::Tensor& labels, int64_t H, int64_t W,
                                                       int64_t num_classes, int64_t ignore_index) {
  TORCH_CHECK_VALUE(H * W / 8 < (int64_t{1} << 31), "feats: at most 2^34 pixels per image, got ", H * W);
  return per_image(labels,
                   [&](const at::Tensor& l, int64_t b) { return label_chunks(l, b, H, W, num_classes, ignore_index); });
}

// Chunks of every image of a class-slot map [B, H, W] int16 (from _label_slots), its values
// checked as slot_runs_per_image checks them. One thread, as there.
inline std::vector<LabelChunks> slot_chunks_per_image(const at::Tensor& slots_in, int64_t num_classes) {
  const at::Tensor slots = slots_in.contiguous();
  const int64_t B = slots.size(0), HW = slots.size(1) * slots.size(2);
  TORCH_CHECK_VALUE(HW / 8 < (int64_t{1} << 31), "feats: at most 2^34 pixels per image, got ", HW);
  const int16_t* all = slots.const_data_ptr<int16_t>();
  std::vector<LabelChunks> out(B);
  for (int64_t b = 0; b < B; ++b) {
    const int16_t* s = all + b * HW;
    check_slot_values(s, HW, b, num_classes);
    out[b] = chunks_of_slots(std::vector<int32_t>(s, s + HW), num_classes);
  }
  return out;
}

}  // namespace idd_ops
