#pragma once
// Loops of the CPU cosine map (IFVD) for float32 features, 8 feature rows at a time over an
// image's chunks of 8 pixels (label_chunks.h), compiled per CPU capability in
// pixel_centroid_cosine.cpp. `table`-like arguments hold 8 values per class slot (one per row),
// with a row for the ignore slot too.
#include <cstdint>

#include "../dispatch.h"
#include "class_centroids.h"

namespace idd_ops {

// For the 8 rows x + r * hw (r < 8) of one image, over the chunks of `spans` and the tail
// pixels [tail0, tail1): nf[p - base] += sum_r x_r[p]^2 and
// dot[p - base] += sum_r x_r[p] * centre[slot[p] * 8 + r] (rows summed in order r = 0..7, then
// added: the same rounding in every kind of chunk).
IDD_DECLARE_CPU_KERNEL(void cosine_dots_8rows(const float* x, int64_t hw, const int32_t* slot, const ChunkSpan* spans,
                                              int64_t n_spans, int64_t tail0, int64_t tail1, const float* centre,
                                              float* dot, float* nf, int64_t base))

// The gradient rows of the same 8 rows, with the per-pixel factors a and bf (0 at ignored
// pixels), s = slot[p], over every full chunk of `spans` and the pixels from hw / 8 * 8 on, in
// one of three passes: `out` null: sums[s * 8 + r] += a[p] * x_r[p] only; `share` given:
// out_r[p] = a[p] * centre[s * 8 + r] + bf[p] * x_r[p] + share[s * 8 + r] only; else both
// out_r[p] (without the share) and the sums.
IDD_DECLARE_CPU_KERNEL(void cosine_grad_8rows(const float* x, float* out, int64_t hw, const int32_t* slot,
                                              const ChunkSpan* spans, int64_t n_spans, const float* a,
                                              const float* bf, const float* centre, const float* share,
                                              float* sums))

}  // namespace idd_ops
