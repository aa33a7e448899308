// The centroid norms and the backward rows grid that both IFVD cosine sources share
// (pixel_centroid_cosine_cuda.cu: the labels ops; pixel_centroid_cosine_slots_cuda.cu: the
// slot-map ops).
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "../common/cuda_next.h"
#include "cuda_utils.cuh"

namespace idd_ops {

template <typename acc_t>
__global__ void centroid_norms_kernel(const acc_t* __restrict__ cent, int64_t BK, int64_t C, acc_t* __restrict__ out) {
  for (int64_t bk = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; bk < BK;
       bk += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    acc_t s = 0;
    for (int64_t c = 0; c < C; ++c) s += cent[bk * C + c] * cent[bk * C + c];
    out[bk] = sqrt(s);
  }
}

// The IDD_OPS_CUDA_NEXT norms: one warp per centroid row, its lanes reading the row's channels
// coalesced (lane, lane + 32, ...) and adding their partial sums by a butterfly, so the same bits
// on every run. The kernel above gives each row to one thread: at IFVD's Cityscapes shape 152
// threads of one block each walk 2048 channels in series, three times per call, where this
// spreads a row over a warp and the rows over 19 blocks.
template <typename acc_t>
__global__ void centroid_norms_warp_kernel(const acc_t* __restrict__ cent, int64_t BK, int64_t C,
                                           acc_t* __restrict__ out) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32, warps = gridDim.x * warps_per_block;
  for (int64_t bk = blockIdx.x * warps_per_block + threadIdx.x / 32; bk < BK; bk += warps) {
    // warp-uniform: every lane of a warp takes the same rows
    acc_t s = 0;
    for (int64_t c = lane; c < C; c += 32) s += cent[bk * C + c] * cent[bk * C + c];
    s = warp_sum(s);
    if (lane == 0) out[bk] = sqrt(s);
  }
}

// Norms [B, K] of centroids [B, K, C] in the accumulation dtype, on `stream`.
inline at::Tensor centroid_norms(const at::Tensor& cent, cudaStream_t stream) {
  const int64_t BK = cent.size(0) * cent.size(1);
  at::Tensor out = at::empty({cent.size(0), cent.size(1)}, cent.options());
  if (BK == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(cent.scalar_type(), "centroid_norms_cuda", [&] {
    if (cuda_next_enabled()) {
      centroid_norms_warp_kernel<scalar_t><<<blocks_for(BK * 32), kThreads, 0, stream>>>(
          cent.const_data_ptr<scalar_t>(), BK, cent.size(2), out.data_ptr<scalar_t>());
    } else {
      centroid_norms_kernel<scalar_t><<<blocks_for(BK), kThreads, 0, stream>>>(cent.const_data_ptr<scalar_t>(), BK,
                                                                               cent.size(2), out.data_ptr<scalar_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// The backward rows kernels' grid: a block per (image, channel) row, at most 2^31 - 1 of them.
inline unsigned int row_blocks(int64_t B, int64_t C) {
  TORCH_CHECK_VALUE(B * C <= std::numeric_limits<int>::max(), "feats: at most 2^31 - 1 images times channels on CUDA, ",
                    "got ", B, " x ", C);
  return static_cast<unsigned int>(B * C);
}

}  // namespace idd_ops
