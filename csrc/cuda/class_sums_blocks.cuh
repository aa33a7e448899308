#pragma once
// What every class-sum kernel shares (class_sums_cuda.cu plans and launches them): the jobs of a
// launch, a block's place in its job, the per-channel pivot, the write of a block's sums, and
// the in-order addition of the segments' partial sums.
//
// Precision with a common offset: a block adds x - pivot in the accumulation type (float32 for
// float32/half/bfloat16, float64 for float64), pivot = the channel's value at the image's first
// pixel, and writes its sums as float64 with count * pivot added back. Features that share a
// per-channel offset then differ from their pivot by about the classes' spread, not by the
// offset: x - pivot is exact where x lies within a factor 2 of the pivot (Sterbenz), and each
// float32 addition rounds at the spread's scale (float32 values near an offset O are multiples
// of its unit in the last place, so partial sums below about 2 O are even exact); the
// offset's part, count * pivot, is formed and added in float64 (relative rounding about 1e-16),
// so a sum's relative error is at worst about eps32 * kMaxSerial * spread / offset, where the
// raw values' float32 chains give eps32 * kMaxSerial. Every block of an (image, channel) reads
// the same element for its pivot, so they agree without talking.
// A non-finite first value gives pivot 0: one inf pixel must not turn every class into NaN.
#include <ATen/OpMathType.h>
#include <cuda_runtime.h>

#include <cmath>

#include "cuda_utils.cuh"

namespace idd_ops {
namespace class_sums_cuda {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kPrivateThreads = 256;  // P's block
constexpr int kWarps = 4;             // L's block, and W's at most (W takes fewer where K needs)
constexpr int kTile = 2;              // channels per block of P and W: one slot load serves both
constexpr int kLastUnroll = 4;        // pixels loaded ahead per lane in L
constexpr int kStepsAhead = 2;        // steps of P, chunks of W, loaded before the first is added
// Longest chain of sequential float additions into one accumulator (float32 error grows about
// linearly with it), and the fewest steps per thread that make a segment worth a block.
constexpr int kMaxSerial = 1024;
constexpr int kMinSteps = 4;

// One feature map's pass; the pair op launches two in one grid.
struct SumsJob {
  const void* feats;     // [B, C, H, W] NCHW, or [B, H, W, C] memory for L
  const int16_t* slots;  // [B, HW]
  double* sums;          // [B, segs, K, C] (segs == 1: the output itself)
  int64_t* counts;       // [B, segs, K]
  int C, HW, tiles, segs, seg_len, blocks;
};

struct SumsJobs {
  SumsJob job[2];
  int K;
};

// The job of this block, and the block's place in it: image b, channel tile, pixels [p0, p1).
struct BlockWork {
  SumsJob j;
  int b, tile, seg, p0, p1;
};

__device__ __forceinline__ BlockWork block_work(const SumsJobs& jobs) {
  BlockWork w;
  int blk = blockIdx.x;
  const bool second = blk >= jobs.job[0].blocks;
  w.j = second ? jobs.job[1] : jobs.job[0];
  if (second) blk -= jobs.job[0].blocks;
  w.seg = blk % w.j.segs;
  const int rest = blk / w.j.segs;
  w.tile = rest % w.j.tiles;
  w.b = rest / w.j.tiles;
  w.p0 = w.seg * w.j.seg_len;
  // the last segment ends at HW (p0 + seg_len may pass 2^31 there)
  w.p1 = w.seg == w.j.segs - 1 ? w.j.HW : w.p0 + w.j.seg_len;
  return w;
}

// A slot read from the map, checked against [-1, K) on the device (a host check would need a
// sync; the CPU raises a ValueError): a larger one would index past the block's class sums.
__device__ __forceinline__ void check_slot(int s, int K) {
  CUDA_KERNEL_ASSERT(s >= -1 && s < K && "slots: a value is outside [-1, num_classes)");
}

__device__ __forceinline__ double* block_sums(const BlockWork& w, int K) {
  return w.j.sums + (static_cast<int64_t>(w.b) * w.j.segs + w.seg) * K * w.j.C;
}

__device__ __forceinline__ int64_t* block_counts(const BlockWork& w, int K) {
  return w.j.counts + (static_cast<int64_t>(w.b) * w.j.segs + w.seg) * K;
}

// The pivot of a channel: its value at the image's first pixel (`first` points there), 0 where
// that value is not finite.
template <typename scalar_t>
__device__ __forceinline__ at::opmath_type<scalar_t> pivot_of(scalar_t first) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t v = static_cast<acc_t>(first);
  return isfinite(v) ? v : acc_t(0);
}

// A block's sum of x - pivot over n pixels of a class, as the float64 sum of x.
template <typename acc_t>
__device__ __forceinline__ double unpivot(acc_t shifted, int n, acc_t pivot) {
  return static_cast<double>(shifted) + static_cast<double>(n) * static_cast<double>(pivot);
}

// The segments' float64 partial sums and counts of up to two jobs, added in segment order.
struct Combine {
  const double* partial[2];
  const int64_t* partial_counts[2];
  double* sums[2];
  int64_t* counts[2];
  int64_t rows[2];  // B * K of each job (0: nothing to combine)
  int segs[2], C[2], K;
};

static __global__ void combine_segments_kernel(const Combine cb) {
  const int64_t total0 = cb.rows[0] * (cb.C[0] + 1), total = total0 + cb.rows[1] * (cb.C[1] + 1);
  for (int64_t e = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; e < total;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int j = e < total0 ? 0 : 1;
    const int64_t i = j == 0 ? e : e - total0, C1 = cb.C[j] + 1;
    // (b, k, c) is one output element; c == C stands for the count of (b, k)
    const int64_t row = i / C1, c = i % C1, b = row / cb.K, k = row % cb.K;
    const int segs = cb.segs[j];
    if (c < cb.C[j]) {
      const double* part = cb.partial[j] + (b * segs * cb.K + k) * cb.C[j] + c;
      double v = 0.0;
      for (int s = 0; s < segs; ++s) v += part[static_cast<int64_t>(s) * cb.K * cb.C[j]];
      cb.sums[j][row * cb.C[j] + c] = v;
    } else {
      const int64_t* part = cb.partial_counts[j] + b * segs * cb.K + k;
      int64_t v = 0;
      for (int s = 0; s < segs; ++s) v += part[static_cast<int64_t>(s) * cb.K];
      cb.counts[j][row] = v;
    }
  }
}

}  // namespace class_sums_cuda
}  // namespace idd_ops
