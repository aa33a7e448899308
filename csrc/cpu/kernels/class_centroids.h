#pragma once
// Loops of the CPU centroid pass, compiled per CPU capability in class_centroids.cpp.
#include <ATen/OpMathType.h>

#include <cstdint>

#include "../dispatch.h"

namespace idd_ops {

// sums[cls[r]] += x[start[r]] + ... + x[start[r + 1] - 1] for every run r < runs with
// cls[r] >= 0 (the label runs of one image, see label_runs.h), accumulated in acc_t.
IDD_DECLARE_CPU_KERNEL(template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>> void add_run_sums(
    const scalar_t* x, const int64_t* start, const int64_t* cls, int64_t runs, acc_t* sums))

// For the n channels x[p * ld + c] (c < n) of each channels_last pixel p < hw with
// slot[p] >= 0: table[slot[p] * n + c] += x - pivot[c], accumulated in acc_t (one pass over the
// pixels however short the runs of their classes; table holds a row of n per class).
IDD_DECLARE_CPU_KERNEL(template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>> void add_pixel_blocks(
    const scalar_t* x, int64_t ld, int64_t hw, const int16_t* slot, int64_t n, const acc_t* pivot, acc_t* table))

// One step of the walk over an image's chunks of 8 pixels (see label_chunks.h): `count`
// chunks from chunk `chunk` on whose pixels all have class slot `slot`, or one chunk of
// several slots (slot == kMixedChunk, count == 1).
struct ChunkSpan {
  int32_t slot;
  int32_t chunk;
  int32_t count;
};
constexpr int32_t kMixedChunk = -1;

// For the 8 feature rows x + r * hw (r < 8) of one image: sums[s * 8 + r] += the sum of
// x - pivot[r] over the pixels of slot s in row r, for every slot s < ignore_slot. `slot` holds
// every pixel's slot, `spans` walks its hw / 8 full chunks; sums has room for slot ignore_slot
// too. The pivot (a value of the row) keeps float32 sums exact to the features' spread when
// they share a large offset (ReLU features): the sum of the raw values would round at the
// offset's scale, once per add.
IDD_DECLARE_CPU_KERNEL(void add_chunk_sums_8rows(const float* x, int64_t hw, const int32_t* slot,
                                                 const ChunkSpan* spans, int64_t n_spans, int32_t ignore_slot,
                                                 const float* pivot, float* sums))

// The reverse: out[r * hw + p] = values[slot[p] * 8 + r] for the 8 rows r < 8 and every pixel p.
IDD_DECLARE_CPU_KERNEL(void write_chunk_values_8rows(float* out, int64_t hw, const int32_t* slot,
                                                     const ChunkSpan* spans, int64_t n_spans, const float* values))

}  // namespace idd_ops
