#pragma once
// The class-sum kernel of channels_last features, read in place (class_sums_cuda.cu plans it):
//  L  lanes own VEC consecutive channels of a 32 x VEC channel tile, so a pixel's class is the
//     same for the whole warp and a lane adds each run of equal slots in registers; warps own
//     private sums priv[k][warp][channel of the tile]. K <= 47 with 16-byte lanes, K <= 190 with
//     one channel per lane (float32 accumulation and 96 KiB; less where the GPU offers less);
//     larger K pays one NCHW copy and takes W.
// It sums x - pivot (class_sums_blocks.cuh) and counts its own pixels, for the float64 write.
#include "class_sums_blocks.cuh"
#include "class_sums_fold.cuh"

namespace idd_ops {
namespace class_sums_cuda {

// The block's pass, for sums_last_kernel and its folded twin.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void last_pass(const SumsJobs& jobs) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kLanesC = 32 * VEC;
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = jobs.K, tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  acc_t* priv = reinterpret_cast<acc_t*>(smem);
  int* cnt = reinterpret_cast<int*>(priv + K * kWarps * kLanesC);
  const BlockWork w = block_work(jobs);
  const int C = w.j.C, c_first = w.tile * kLanesC, c = c_first + lane * VEC;
  for (int e = tid; e < K * kWarps * kLanesC; e += kWarps * 32) priv[e] = acc_t(0);
  for (int e = tid; e < K; e += kWarps * 32) cnt[e] = 0;
  __syncthreads();

  const bool active = c < C;  // C is a multiple of VEC: a lane's vector is whole or absent
  // the image's first pixel: the pivots
  const scalar_t* first = static_cast<const scalar_t*>(w.j.feats) + static_cast<int64_t>(w.b) * w.j.HW * C;
  const scalar_t* img = first + c;
  acc_t pivot[VEC] = {};
  if (active) {
    const Vec<scalar_t, VEC> x0 = load_vec<scalar_t, VEC>(img);
#pragma unroll
    for (int i = 0; i < VEC; ++i) pivot[i] = pivot_of(x0.v[i]);
  }
  const int16_t* slot = w.j.slots + static_cast<int64_t>(w.b) * w.j.HW;
  const bool counting = lane == 0;  // one lane per warp counts the warp's pixels
  const int share = (w.p1 - w.p0 + kWarps - 1) / kWarps;
  const int q0 = w.p0 + warp * share, q1 = min(w.p1, q0 + share);
  acc_t run[VEC] = {};
  int cur = -1, n = 0;
  auto flush = [&]() {
    if (cur < 0) return;
    if (active) {
#pragma unroll
      for (int i = 0; i < VEC; ++i) priv[(cur * kWarps + warp) * kLanesC + lane * VEC + i] += run[i];
    }
    if (counting) atomicAdd(&cnt[cur], n);
  };
  for (int q = q0; q < q1; q += kLastUnroll) {
    int s[kLastUnroll];
    Vec<scalar_t, VEC> x[kLastUnroll];
#pragma unroll
    for (int u = 0; u < kLastUnroll; ++u) {  // loads first, so several are in flight
      s[u] = q + u < q1 ? slot[q + u] : -2;
      if (q + u < q1) check_slot(s[u], K);  // before -2, the end mark, could pass for a slot
      if (active && q + u < q1) x[u] = load_vec<scalar_t, VEC>(img + static_cast<int64_t>(q + u) * C);
    }
#pragma unroll
    for (int u = 0; u < kLastUnroll; ++u) {
      if (s[u] == -2) break;
      if (s[u] != cur) {
        flush();
        cur = s[u];
        n = 0;
#pragma unroll
        for (int i = 0; i < VEC; ++i) run[i] = acc_t(0);
      }
      ++n;
      if (active) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) run[i] += static_cast<acc_t>(x[u].v[i]) - pivot[i];
      }
    }
  }
  flush();
  __syncthreads();

  double* out = block_sums(w, K);
  for (int e = tid; e < K * kLanesC; e += kWarps * 32) {
    const int k = e / kLanesC, cl = e % kLanesC;
    if (c_first + cl >= C) continue;
    acc_t v = acc_t(0);
#pragma unroll
    for (int u = 0; u < kWarps; ++u) v += priv[(k * kWarps + u) * kLanesC + cl];
    out[static_cast<int64_t>(k) * C + c_first + cl] = unpivot(v, cnt[k], pivot_of(first[c_first + cl]));
  }
  if (w.tile == 0)
    for (int k = tid; k < K; k += kWarps * 32) block_counts(w, K)[k] = cnt[k];
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarps * 32) sums_last_kernel(const SumsJobs jobs) {
  last_pass<scalar_t, VEC>(jobs);
}

// The next set's (class_sums_fold.cuh); a tile is 32 x VEC channels.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarps * 32) sums_last_folded_kernel(const SumsJobs jobs, const Fold fold) {
  last_pass<scalar_t, VEC>(jobs);
  finish_split(jobs, 32 * VEC, fold);
}

}  // namespace class_sums_cuda
}  // namespace idd_ops
