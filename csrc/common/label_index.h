#pragma once
// Label lookup shared by the CPU and CUDA kernels: nearest-neighbour resize index
// and the mapping of a raw label to a class slot.
#include <c10/macros/Macros.h>
#include <cstdint>

namespace idd_ops {

// Class slots at feature resolution (_label_slots) are int16: -1 for ignored pixels, so at most
// 32767 classes (the CUDA class sums allow fewer: one warp's sums of K classes must fit shared memory).
constexpr int64_t kMaxSlotClasses = 32767;

// Source index of output index `dst` when resizing `in_size` -> `out_size` by nearest
// neighbour. Reproduces F.interpolate(mode="nearest") bit for bit, including its float
// scale (so odd ratios round exactly as PyTorch rounds them).
C10_HOST_DEVICE inline int64_t nearest_source_index(int64_t dst, int64_t in_size, int64_t out_size) {
  if (in_size == out_size) return dst;
  const float scale = static_cast<float>(in_size) / static_cast<float>(out_size);
  const int64_t src = static_cast<int64_t>(floorf(static_cast<float>(dst) * scale));
  return src < in_size - 1 ? src : in_size - 1;
}

// Flat index into one [Hy, Wy] label image of feature pixel (row, col) of an [H, W] map.
C10_HOST_DEVICE inline int64_t label_offset(int64_t row, int64_t col, int64_t H, int64_t W,
                                            int64_t Hy, int64_t Wy) {
  return nearest_source_index(row, Hy, H) * Wy + nearest_source_index(col, Wy, W);
}

// Class slot of a raw label: the class in [0, K) or -1 for `ignore_index` and for any
// value outside [0, K) (kernels that can report bad labels do so before this point).
C10_HOST_DEVICE inline int64_t class_slot(int64_t raw, int64_t num_classes, int64_t ignore_index) {
  if (raw == ignore_index || raw < 0 || raw >= num_classes) return -1;
  return raw;
}

}  // namespace idd_ops
