#pragma once
// Shared by the fused IDD tail's CUDA files: idd_tail_forward_cuda.cu (tile and finish kernels),
// idd_tail_backward_cuda.cu and idd_tail_cuda.cu (host side and registration). The math, the
// centroid shift and the saved tensors: common/idd_tail.h.
//
// Two types: sum_t, the class sums' (float or double), and acc_t, the dtype of the K x K math
// and dist (the op's `dtype`); the loss is float or double (`loss_dtype`) whatever acc_t is. Centroids and their shift by the image's first present
// centroid are formed in sum_t, so float64 sums of a common offset cancel it before the
// rounding; the centred difference is cast to acc_t and everything after runs there, as the
// composite does. Taken: (float, float), (double, double) and (double, float).
#include <ATen/ATen.h>

#include "../common/idd_tail.h"
#include "cuda_utils.cuh"

namespace idd_ops {

// The fused path takes K up to this (the tile partials must fit in stats' K rows: P(K) <= K).
constexpr int64_t kMaxFusedClasses = 4096;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Read-only view of one network's sums [B, K, C] (any strides) and counts [B, K].
template <typename sum_t>
struct SumsView {
  const sum_t* sums;
  int64_t sb, sk, sc;
  const int64_t* counts;
  int64_t nb, nk;
  int64_t C;

  __device__ sum_t sum(int64_t b, int64_t k, int64_t c) const { return __ldg(sums + b * sb + k * sk + c * sc); }
  __device__ int64_t count(int64_t b, int64_t k) const { return __ldg(counts + b * nb + k * nk); }
  // 1 / count_k, 0 for an absent class, in sum_t
  __device__ sum_t inverse_count(int64_t b, int64_t k) const {
    const int64_t n = count(b, k);
    return n > 0 ? sum_t(1) / static_cast<sum_t>(n) : sum_t(0);
  }
  // c_k = sum_k * (1 / count_k), as the composite (0 for an absent class): with `inv` from
  // inverse_count, so that every kernel forms the same bits
  __device__ sum_t centroid(int64_t b, int64_t k, int64_t c, sum_t inv) const {
    return inv != sum_t(0) ? sum(b, k, c) * inv : sum_t(0);
  }
};

template <typename sum_t>
SumsView<sum_t> sums_view(const at::Tensor& sums, const at::Tensor& counts) {
  return {sums.const_data_ptr<sum_t>(), sums.stride(0), sums.stride(1), sums.stride(2),
          counts.const_data_ptr<int64_t>(), counts.stride(0), counts.stride(1), sums.size(2)};
}

// The first class k < K with count > 0 (K if none), for every thread of the block. Calls
// __syncthreads: every thread must reach it. `scratch`: kWarps ints of shared memory.
template <typename sum_t>
__device__ int first_present(const SumsView<sum_t>& v, int64_t b, int K, int* scratch) {
  int best = K;
  for (int k = threadIdx.x; k < K; k += kThreads) {
    if (v.count(b, k) > 0) {
      best = k;
      break;
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) best = min(best, __shfl_down_sync(kFullMask, best, offset));
  if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = best;
  __syncthreads();
  int first = K;
  for (int w = 0; w < kWarps; ++w) first = min(first, scratch[w]);
  __syncthreads();  // scratch may be reused right after
  return first;
}

// Sums of N values over the block, in a fixed order; the totals are valid in thread 0.
// `scratch`: N * kWarps doubles of shared memory.
template <int N>
__device__ void block_sums(double (&v)[N], double* scratch) {
#pragma unroll
  for (int k = 0; k < N; ++k) {
    for (int offset = 16; offset > 0; offset /= 2) v[k] += __shfl_down_sync(kFullMask, v[k], offset);
    if (threadIdx.x % 32 == 0) scratch[k * kWarps + threadIdx.x / 32] = v[k];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < N; ++k) {
      double total = scratch[k * kWarps];
      for (int w = 1; w < kWarps; ++w) total += scratch[k * kWarps + w];
      v[k] = total;
    }
  }
  __syncthreads();
}

// Whether the fused kernels compute in `acc` from sums of `sums` (see the top of this file).
inline bool fused_types(at::ScalarType sums, at::ScalarType acc) {
  return (sums == acc && (acc == at::kFloat || acc == at::kDouble)) || (sums == at::kDouble && acc == at::kFloat);
}

// Calls f(sum_t{}, acc_t{}) for a pair that fused_types takes.
template <typename F>
void dispatch_tail_types(at::ScalarType sums, at::ScalarType acc, const char* name, F&& f) {
  if (sums == at::kFloat && acc == at::kFloat) return f(float{}, float{});
  if (sums == at::kDouble && acc == at::kDouble) return f(double{}, double{});
  if (sums == at::kDouble && acc == at::kFloat) return f(double{}, float{});
  TORCH_CHECK(false, name, ": no fused kernel for ", sums, " sums computing in ", acc);
}

// Fused forward (idd_tail_forward_cuda.cu): fills loss [B] or [] (float32 or float64), dist
// [B, 2, K, K] in the compute dtype and stats [B, K + 1, 8] float64; inputs checked, types from
// fused_types.
void idd_tail_fused_forward(const at::Tensor& student_sums, const at::Tensor& student_counts,
                            const at::Tensor& teacher_sums, const at::Tensor& teacher_counts, Metric metric,
                            bool normalize, double eps, Reduction reduction, at::Tensor& loss, at::Tensor& dist,
                            at::Tensor& stats);

// Fused backward (idd_tail_backward_cuda.cu): fills out [B, K, C] (contiguous, the sums' dtype);
// grad float32 or float64.
void idd_tail_fused_backward(const at::Tensor& grad, const at::Tensor& student_sums, const at::Tensor& student_counts,
                             const at::Tensor& teacher_counts, const at::Tensor& dist, const at::Tensor& stats,
                             Metric metric, double eps, Reduction reduction, at::Tensor& out);

}  // namespace idd_ops
