// The centroid norms and the backward rows grid that both IFVD cosine sources share
// (pixel_centroid_cosine_cuda.cu: the labels ops; pixel_centroid_cosine_slots_cuda.cu and
// cosine_slots_backward_cuda.cu: the slot-map ops), and the slot ops' centroid table (norms and
// a channel-major copy in one launch; both networks' from their class sums for IFVD's two maps,
// ifvd_maps_cuda.cu).
#pragma once

#include <ATen/ATen.h>

#include <limits>

#include "cuda_utils.cuh"

namespace idd_ops {

// Centroid norms: one warp per centroid row, its lanes reading the row's channels coalesced
// (lane, lane + 32, ...) and adding their partial sums by a butterfly, so the same bits on every
// run. A thread per row (the first kernel here) left 152 threads of one block walking 2048
// channels each in series at IFVD's Cityscapes shape, three times per call; a warp per row
// spreads the rows over 19 blocks.
template <typename acc_t>
__global__ void centroid_norms_warp_kernel(const acc_t* __restrict__ cent, int64_t K, int64_t BK, int64_t C,
                                           acc_t* __restrict__ out, acc_t* __restrict__ cent_t) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32, warps = gridDim.x * warps_per_block;
  for (int64_t bk = blockIdx.x * warps_per_block + threadIdx.x / 32; bk < BK; bk += warps) {
    // warp-uniform: every lane of a warp takes the same rows
    acc_t* column = cent_t ? cent_t + (bk / K) * C * K + bk % K : nullptr;
    acc_t s = 0;
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t v = cent[bk * C + c];
      if (column) column[c * K] = v;
      s += v * v;
    }
    s = warp_sum(s);
    if (lane == 0) out[bk] = sqrt(s);
  }
}

// The slot kernels' centroid table: with `cent_t`, the kernel above also writes each value to its
// place in the channel-major copy cent_t [B, C, K] (K neighbouring words per channel: the slot
// kernels' per-pixel reads), beside the same norms. One launch where a transposing copy and the
// norms were two. The copy's stores lie K words apart within a warp: a [B, K, C] table is small
// (1.2 MB at IFVD's Cityscapes teacher), and L2 merges the partial sectors of a table written whole.
struct CentroidTable {
  at::Tensor channel_major;  // [B, C, K]
  at::Tensor norms;          // [B, K]
};

// Channel-major copy and norms of centroids [B, K, C] (contiguous, the accumulation dtype), on
// `stream`, in one launch.
inline CentroidTable centroid_table(const at::Tensor& cent, cudaStream_t stream) {
  const int64_t B = cent.size(0), K = cent.size(1), C = cent.size(2), BK = B * K;
  CentroidTable t{at::empty({B, C, K}, cent.options()), at::empty({B, K}, cent.options())};
  if (BK == 0) return t;
  AT_DISPATCH_FLOATING_TYPES(cent.scalar_type(), "centroid_table_cuda", [&] {
    centroid_norms_warp_kernel<scalar_t><<<blocks_for(BK * 32), kThreads, 0, stream>>>(
        cent.const_data_ptr<scalar_t>(), K, BK, C, t.norms.data_ptr<scalar_t>(), t.channel_major.data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return t;
}

// One network's centroid table built from its float64 class sums (centroid_tables_from_sums_kernel).
template <typename acc_t>
struct SumsTable {
  const double* sums;  // [B, K, C]
  int64_t C;
  acc_t* cent_t;  // [B, C, K], channel-major
  acc_t* norms;   // [B, K]
  acc_t* cent;    // [B, K, C] row-major as well, or nullptr
};

// IFVD's two maps in one op (ifvd_maps_cuda.cu): both networks' tables in one launch, from their
// class sums and the counts [B, K] they share (one slot map), warp rows [0, BK) the student's and
// [BK, 2 BK) the teacher's. Each value is sum / max(count, 1) in float64 rounded once to acc_t, as
// the division with an acc_t output gives, and its norm adds in centroid_norms_warp_kernel's
// order: the bits of the centroids divided apart and centroid_table, one launch where those took
// five (a clamp, two divisions, then a table per network).
template <typename acc_t>
__global__ void centroid_tables_from_sums_kernel(const SumsTable<acc_t> student, const SumsTable<acc_t> teacher,
                                                 const int64_t* __restrict__ counts, int64_t K, int64_t BK) {
  const int lane = threadIdx.x % 32;
  const int64_t warps_per_block = blockDim.x / 32, warps = gridDim.x * warps_per_block;
  for (int64_t row = blockIdx.x * warps_per_block + threadIdx.x / 32; row < 2 * BK; row += warps) {
    // warp-uniform: every lane of a warp takes the same rows
    const bool is_teacher = row >= BK;
    const SumsTable<acc_t>& net = is_teacher ? teacher : student;
    const int64_t bk = is_teacher ? row - BK : row, C = net.C;
    const double divisor = static_cast<double>(counts[bk] > 1 ? counts[bk] : 1);
    acc_t* column = net.cent_t + (bk / K) * C * K + bk % K;
    acc_t s = 0;
    for (int64_t c = lane; c < C; c += 32) {
      const acc_t v = static_cast<acc_t>(net.sums[bk * C + c] / divisor);
      column[c * K] = v;
      if (net.cent) net.cent[bk * C + c] = v;
      s += v * v;
    }
    s = warp_sum(s);
    if (lane == 0) net.norms[bk] = sqrt(s);
  }
}

// Norms [B, K] of centroids [B, K, C] in the accumulation dtype, on `stream`.
inline at::Tensor centroid_norms(const at::Tensor& cent, cudaStream_t stream) {
  const int64_t BK = cent.size(0) * cent.size(1);
  at::Tensor out = at::empty({cent.size(0), cent.size(1)}, cent.options());
  if (BK == 0) return out;
  AT_DISPATCH_FLOATING_TYPES(cent.scalar_type(), "centroid_norms_cuda", [&] {
    centroid_norms_warp_kernel<scalar_t><<<blocks_for(BK * 32), kThreads, 0, stream>>>(
        cent.const_data_ptr<scalar_t>(), cent.size(1), BK, cent.size(2), out.data_ptr<scalar_t>(), nullptr);
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
