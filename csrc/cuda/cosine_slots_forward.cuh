#pragma once
// The slot-map cosine forward (the IFVD map of one network: pixel_centroid_cosine_slots_cuda.cu;
// of both networks in one launch: ifvd_maps_cuda.cu) and the slot reads every slot kernel shares.
#include <ATen/OpMathType.h>

#include "../common/cosine.h"
#include "cuda_utils.cuh"

namespace idd_ops {

// Class of pixel p of a slot map, checked against [-1, K) on the device (a host check would
// need a sync), as pixel_class checks labels.
__device__ __forceinline__ int checked_slot(int k, int K) {
  CUDA_KERNEL_ASSERT(k >= -1 && k < K && "slots: a value is outside [-1, num_classes)");
  return k;
}

__device__ __forceinline__ int slot_class(const int16_t* __restrict__ slots, int64_t p, int K) {
  return checked_slot(slots[p], K);
}

// Pixels a forward block takes (one per lane) and the channel groups it splits them over (one
// per warp): kThreads / kCosinePixels warps.
constexpr int kCosinePixels = 32, kCosineGroups = kThreads / kCosinePixels;

// Partial sums of a forward block: kCosineGroups rows of kCosinePixels.
template <typename acc_t>
using CosinePartials = acc_t[kCosineGroups][kCosinePixels];

// Block (x, b) takes pixels [32 x, 32 x + 32) of image b (images grid-strided). Warp w adds
// channels w, w + 8, ... of its lane's pixel: each load is 32 neighbouring pixels of one channel,
// and a block has 8 loads in flight per unrolled step where one thread per pixel walking all C
// channels in series kept too few bytes in flight to reach the memory bound (the H200 measured
// IFVD's forward at 5x its bound so). The 8 partial sums add in warp order: the same bits on
// every run. The centroids come channel-major (cent_t [B, C, K]: centroid_table), so the
// lanes of a fragmented map read their classes' values of a channel from K neighbouring words
// rather than from K rows C values apart.
template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
__device__ __forceinline__ void cosine_slots_forward_block(const scalar_t* __restrict__ f,
                                                           const acc_t* __restrict__ cent_t,
                                                           const acc_t* __restrict__ cnorm,
                                                           const int16_t* __restrict__ slots, int64_t B, int64_t C,
                                                           int64_t HW, int K, acc_t eps, acc_t* __restrict__ cos,
                                                           acc_t* __restrict__ fnorm, CosinePartials<acc_t>& part_dot,
                                                           CosinePartials<acc_t>& part_nf) {
  const int lane = threadIdx.x % kCosinePixels, group = threadIdx.x / kCosinePixels;
  const int64_t p = blockIdx.x * static_cast<int64_t>(kCosinePixels) + lane;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    const int k = p < HW ? slot_class(slots + b * HW, p, K) : -1;
    acc_t dot = 0, nf = 0;
    if (p < HW) {
      const scalar_t* x = f + b * C * HW + p;
      const acc_t* cy = cent_t + b * C * K + (k >= 0 ? k : 0);  // an ignored pixel's dot is never used
#pragma unroll 8
      for (int64_t c = group; c < C; c += kCosineGroups) {
        const acc_t v = static_cast<acc_t>(x[c * HW]);
        nf += v * v;
        dot += v * cy[c * K];
      }
    }
    part_dot[group][lane] = dot, part_nf[group][lane] = nf;
    __syncthreads();
    if (group == 0 && p < HW) {
      for (int g = 1; g < kCosineGroups; ++g) dot += part_dot[g][lane], nf += part_nf[g][lane];
      const acc_t norm = sqrt(nf);
      fnorm[b * HW + p] = norm;
      cos[b * HW + p] = k >= 0 ? clamped_cosine(dot, norm, cnorm[b * K + k], eps) : acc_t(1);
    }
    __syncthreads();  // the next image overwrites the partial sums
  }
}

template <typename scalar_t>
__global__ void cosine_slots_forward_kernel(const scalar_t* __restrict__ f,
                                            const at::opmath_type<scalar_t>* __restrict__ cent_t,
                                            const at::opmath_type<scalar_t>* __restrict__ cnorm,
                                            const int16_t* __restrict__ slots, int64_t B, int64_t C, int64_t HW, int K,
                                            at::opmath_type<scalar_t> eps, at::opmath_type<scalar_t>* __restrict__ cos,
                                            at::opmath_type<scalar_t>* __restrict__ fnorm) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part_dot[kCosineGroups][kCosinePixels], part_nf[kCosineGroups][kCosinePixels];
  cosine_slots_forward_block<scalar_t>(f, cent_t, cnorm, slots, B, C, HW, K, eps, cos, fnorm, part_dot, part_nf);
}

}  // namespace idd_ops
