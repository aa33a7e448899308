#pragma once
// A block's class sums for the slot-map cosine backward's kernels (cosine_slots_backward_cuda.cu),
// added in a fixed order, with no atomics, so they are the same bits on every run (ClassSums):
// where K sums per thread fit in shared memory, each thread adds its pixels into its own sums and
// a warp per class adds the block's threads in order; otherwise each warp adds its lanes into
// warp-private sums (one butterfly per class present among its lanes, so a fragmented label map
// costs a loop over its classes) and the block adds its warps' sums in warp order.
#include "cuda_utils.cuh"

// A namespace of its own: idd_ops::ClassSums is the class_sums op's autograd function.
namespace idd_ops::cosine_sums {

// Adds v of the lanes whose class is k into this warp's own sum of class k, sums[k * stride],
// for each class k >= 0 among the lanes: one butterfly per class, lane 0 writes (the sums belong
// to this warp alone). Warp-uniform loop: every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ void warp_add_to_class(acc_t* sums, int64_t stride, int k, acc_t v) {
  unsigned pending = __ballot_sync(0xffffffffu, k >= 0);
  while (pending) {
    const int kk = __shfl_sync(0xffffffffu, k, __ffs(pending) - 1);
    pending &= ~__ballot_sync(0xffffffffu, k == kk);
    const acc_t s = warp_sum(k == kk ? v : acc_t(0));
    if ((threadIdx.x & 31) == 0) sums[kk * stride] += s;
  }
}

// Where a block keeps its class sums (the host picks by K, class_sum_layout below):
//  warps == kThreadSums: per thread, thread t's class k at smem[k * blockDim.x + t] (a warp's
//    lanes hit 32 consecutive words), then finish() puts the class totals at smem[K * blockDim.x + k];
//  warps > 0: per warp, warp w's class k at smem[k * warps + w];
//  warps == 0 (K sums pass the default 48 KiB): the block is one warp that adds straight into
//    `global` (its class k at global[k * global_stride]).
// Constructing it (or start()) zeroes the sums and waits for the block (__syncthreads): every
// thread must construct it, call add() at every step, and call finish() after a __syncthreads
// that follows the adds.
constexpr int kThreadSums = -1;

template <typename acc_t>
struct ClassSums {
  acc_t* sums;  // this thread's (or warp's) class 0
  int64_t stride;
  int warps, K;

  ClassSums() = default;  // start() before use
  __device__ ClassSums(acc_t* smem, int warps_, acc_t* global, int64_t global_stride, int K_) {
    start(smem, warps_, global, global_stride, K_);
  }

  __device__ void start(acc_t* smem, int warps_, acc_t* global, int64_t global_stride, int K_) {
    warps = warps_, K = K_;
    const bool per_thread = warps == kThreadSums;
    sums = per_thread ? smem + threadIdx.x : warps > 0 ? smem + threadIdx.x / 32 : global;
    stride = per_thread ? blockDim.x : warps > 0 ? warps : global_stride;
    acc_t* all = warps != 0 ? smem : global;
    const int64_t n = static_cast<int64_t>(K) * (per_thread ? blockDim.x : warps > 0 ? warps : 1);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) all[warps != 0 ? i : i * global_stride] = 0;
    __syncthreads();
  }

  __device__ void add(int k, acc_t v) {
    if (warps != kThreadSums) {
      warp_add_to_class(sums, stride, k, v);
    } else if (k >= 0) {
      sums[k * stride] += v;
    }
  }

  // Per thread: a warp per class adds the class's blockDim.x sums (each lane its share in thread
  // order, then a butterfly), into smem[K * blockDim.x + k]; ends with a __syncthreads.
  __device__ void finish(acc_t* smem) const {
    if (warps != kThreadSums) return;
    const int lane = threadIdx.x % 32, n = blockDim.x;
    for (int k = threadIdx.x / 32; k < K; k += n / 32) {
      acc_t v = 0;
      for (int t = lane; t < n; t += 32) v += smem[k * n + t];
      v = warp_sum(v);
      if (lane == 0) smem[K * n + k] = v;
    }
    __syncthreads();
  }

  // The block's sum of class k, in a fixed order; call after finish().
  __device__ acc_t total(const acc_t* smem, int k) const {
    if (warps == kThreadSums) return smem[static_cast<int64_t>(K) * blockDim.x + k];
    if (warps == 0) return sums[k * stride];
    acc_t t = 0;
    for (int w = 0; w < warps; ++w) t += smem[k * warps + w];
    return t;
  }
};

}  // namespace idd_ops::cosine_sums
