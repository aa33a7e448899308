#pragma once
// CWD's per-row walks on CUDA (softmax-KL over contiguous vectors, inner == 1), shared by
// softmax_kl's kernels (softmax_kl_cuda.cu) and _pixel_kd_sum's (pixel_kd_sum_cuda.cu): a row's
// online softmax sums merged over its threads (a warp, or the whole block for long rows) in the
// forward, the row's gradient in the backward, and their launch shape.
#include <ATen/OpMathType.h>

#include "../common/softmax_kl_online.h"
#include "cuda_utils.cuh"
#include "softmax_kl_pixels.cuh"
#include "vectorized.cuh"

namespace idd_ops {

template <typename T>
__device__ __forceinline__ void warp_merge(OnlineSoftmaxKL<T>& st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    OnlineSoftmaxKL<T> o;
    o.ms = __shfl_xor_sync(0xffffffffu, st.ms, offset);
    o.zs = __shfl_xor_sync(0xffffffffu, st.zs, offset);
    o.mt = __shfl_xor_sync(0xffffffffu, st.mt, offset);
    o.zt = __shfl_xor_sync(0xffffffffu, st.zt, offset);
    o.w = __shfl_xor_sync(0xffffffffu, st.w, offset);
    st.merge(o);
  }
}

// Merges the sums of the ROW_THREADS threads of each row (a warp, or the whole block); the
// row's first thread holds the result. Every thread of the block calls it.
template <typename T, int ROW_THREADS>
__device__ __forceinline__ void row_merge(OnlineSoftmaxKL<T>& st) {
  warp_merge(st);
  if constexpr (ROW_THREADS > 32) {
    static_assert(ROW_THREADS == kThreads, "a row is a warp or the whole block");
    constexpr int kWarps = kThreads / 32;
    __shared__ T parts[5][kWarps];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    if (lane == 0) {
      parts[0][warp] = st.ms;
      parts[1][warp] = st.zs;
      parts[2][warp] = st.mt;
      parts[3][warp] = st.zt;
      parts[4][warp] = st.w;
    }
    __syncthreads();
    if (warp == 0) {
      OnlineSoftmaxKL<T> o;  // empty sums in lanes past the last warp
      if (lane < kWarps) {
        o.ms = parts[0][lane];
        o.zs = parts[1][lane];
        o.mt = parts[2][lane];
        o.zt = parts[3][lane];
        o.w = parts[4][lane];
      }
      st = o;
      warp_merge(st);
    }
  }
}

// Packs each thread has in flight per input and loop step.
constexpr int kRowUnroll = 2;

// Row `row`'s online softmax sums of s / T and t / T (empty past `outer`), merged over the row's
// ROW_THREADS threads: the result in the row's first thread. Every thread of the block calls it.
template <typename scalar_t, int VEC, int ROW_THREADS>
__device__ __forceinline__ OnlineSoftmaxKL<at::opmath_type<scalar_t>> row_sums(const scalar_t* __restrict__ s,
                                                                              const scalar_t* __restrict__ t,
                                                                              int64_t row, int64_t outer,
                                                                              int64_t length,
                                                                              at::opmath_type<scalar_t> inv_T) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kStep = ROW_THREADS * VEC;
  const int lane = threadIdx.x % ROW_THREADS;
  OnlineSoftmaxKL<acc_t> st;
  if (row < outer) {  // no early return: every thread takes part in row_merge
    const scalar_t* sr = s + row * length;
    const scalar_t* tr = t + row * length;
    for (int64_t j0 = static_cast<int64_t>(lane) * VEC; j0 < length; j0 += kRowUnroll * kStep) {
      acc_t u[kRowUnroll * VEC], v[kRowUnroll * VEC];
#pragma unroll
      for (int k = 0; k < kRowUnroll; ++k) {
        const int64_t j = j0 + k * kStep;  // a multiple of VEC, and VEC divides length
        if (j < length) {
          const auto ps = load_pack<VEC>(sr + j);
          const auto pt = load_pack<VEC>(tr + j);
#pragma unroll
          for (int p = 0; p < VEC; ++p) {
            u[k * VEC + p] = static_cast<acc_t>(ps.v[p]) * inv_T;
            v[k * VEC + p] = static_cast<acc_t>(pt.v[p]) * inv_T;
          }
        } else {
#pragma unroll
          for (int p = 0; p < VEC; ++p) u[k * VEC + p] = v[k * VEC + p] = neg_inf<acc_t>();
        }
      }
      st.add(u, v);
    }
  }
  row_merge<acc_t, ROW_THREADS>(st);
  return st;
}

// Row `row`'s gradient (row < outer) with coef = d loss / d kl of the row, times 1 / T.
template <typename scalar_t, int VEC, int ROW_THREADS>
__device__ __forceinline__ void row_backward(at::opmath_type<scalar_t> coef, const scalar_t* __restrict__ s,
                                             const scalar_t* __restrict__ t, const double* __restrict__ lse_s,
                                             const double* __restrict__ lse_t, int64_t row, int64_t length,
                                             at::opmath_type<scalar_t> inv_T, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kStep = ROW_THREADS * VEC;
  const int lane = threadIdx.x % ROW_THREADS;
  const SplitLse<acc_t> ls = split_lse<acc_t>(lse_s[row]), lt = split_lse<acc_t>(lse_t[row]);
  const int64_t offset = row * length;
  for (int64_t j0 = static_cast<int64_t>(lane) * VEC; j0 < length; j0 += kRowUnroll * kStep) {
    Pack<scalar_t, VEC> ps[kRowUnroll], pt[kRowUnroll];
#pragma unroll
    for (int k = 0; k < kRowUnroll; ++k) {
      const int64_t j = j0 + k * kStep;
      if (j < length) {
        ps[k] = load_pack<VEC>(s + offset + j);
        pt[k] = load_pack<VEC>(t + offset + j);
      }
    }
#pragma unroll
    for (int k = 0; k < kRowUnroll; ++k) {
      const int64_t j = j0 + k * kStep;
      if (j < length) {
        Pack<scalar_t, VEC> r;
#pragma unroll
        for (int p = 0; p < VEC; ++p)
          r.v[p] = static_cast<scalar_t>(kl_grad(coef, static_cast<acc_t>(ps[k].v[p]) * inv_T,
                                                 static_cast<acc_t>(pt[k].v[p]) * inv_T, ls, lt));
        store_pack(out + offset + j, r);
      }
    }
  }
}

// Calls f(std::integral_constant<int, ROW_THREADS>) with the threads of a row of `length`
// elements in packs of VEC: a block from two packs a thread on, else a warp.
template <int VEC, typename F>
void with_row_threads(int64_t length, F&& f) {
  if (length >= 2 * kThreads * VEC)
    f(std::integral_constant<int, kThreads>());
  else
    f(std::integral_constant<int, 32>());
}

inline unsigned int row_grid(int64_t outer, int rows_per_block) {
  return grid_x((outer + rows_per_block - 1) / rows_per_block, "student");
}

}  // namespace idd_ops
