#pragma once
// The next kernel set's finish of a split class-sum job inside its pass (cuda_next.h): the
// kernels of class_sums_nchw.cuh and class_sums_last.cuh call finish_split after their pass, and
// the combine launch of class_sums_blocks.cuh is not needed.
#include "class_sums_blocks.cuh"
#include "grid_tickets.cuh"

namespace idd_ops {
namespace class_sums_cuda {

// The last of an (image, tile)'s segment blocks to write its partials adds them, in segment
// order from 0 as combine_segments_kernel does (the same bits), into the job's outputs.
struct Fold {
  double* sums[2];     // [B, K, C] of each job
  int64_t* counts[2];  // [B, K]
  unsigned* counters;  // one a (job, image, tile), at 0 (grid_tickets.cuh); null where no job is split
};

// The last block's additions for image b, channels [c0, c0 + n) of a job split into `segs`:
// partials [B, segs, K, C] and partial counts [B, segs, K] into sums [B, K, C] (counts [B, K]
// where `counts` is given). Not inlined: inlined, the adds made some instances of the pass spill;
// as a call with scalar arguments no pass loop spills (ptxas sm_90: a 40-byte call frame, and two
// instances keep 8-12 bytes of the job on the stack, stored before the loop, read after it).
static __device__ __noinline__ void add_segments(const double* partial, const int64_t* partial_counts, double* sums,
                                          int64_t* counts, int b, int c0, int n, int segs, int K, int C) {
  const double* part = partial + static_cast<int64_t>(b) * segs * K * C;
  for (int e = threadIdx.x; e < K * n; e += blockDim.x) {
    const int k = e / n, c = c0 + e % n;
    double v = 0.0;
    for (int s = 0; s < segs; ++s) v += part[(static_cast<int64_t>(s) * K + k) * C + c];
    sums[(static_cast<int64_t>(b) * K + k) * C + c] = v;
  }
  if (counts == nullptr) return;
  const int64_t* pc = partial_counts + static_cast<int64_t>(b) * segs * K;
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    int64_t v = 0;
    for (int s = 0; s < segs; ++s) v += pc[static_cast<int64_t>(s) * K + k];
    counts[static_cast<int64_t>(b) * K + k] = v;
  }
}

// Called by every thread of every block after its pass (the block's writes done; `width`: the
// channels of a tile). A block of an unsplit job returns at once (its write was the output).
// The ticket's flag reuses the dynamic shared memory's first byte: the pass is over.
static __device__ __forceinline__ void finish_split(const SumsJobs& jobs, int width, const Fold& fold) {
  const BlockWork w = block_work(jobs);
  if (w.j.segs == 1) return;  // the block's whole job: no barrier below is skipped by part of it
  extern __shared__ __align__(16) unsigned char smem[];
  const int j = blockIdx.x >= jobs.job[0].blocks ? 1 : 0;
  const int group = (j == 1 ? jobs.job[0].blocks / jobs.job[0].segs : 0) + w.b * w.j.tiles + w.tile;
  if (!last_to_arrive(fold.counters + group, static_cast<unsigned>(w.j.segs), reinterpret_cast<bool*>(smem))) return;
  const int c0 = w.tile * width;
  add_segments(w.j.sums, w.j.counts, fold.sums[j], w.tile == 0 ? fold.counts[j] : nullptr, w.b, c0,
               min(w.j.C - c0, width), w.j.segs, jobs.K, w.j.C);  // tile 0's blocks counted the pixels
}

}  // namespace class_sums_cuda
}  // namespace idd_ops
