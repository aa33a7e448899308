#pragma once
// The class-sum kernels of NCHW features (class_sums_cuda.cu picks one per call):
//  P  K <= 23 (float32 accumulation; float64 halves it): threads own private sums [K][2
//     channels] in shared memory, add each run of equal slots in registers, and a warp per
//     (class, channel) adds the 256 private sums.
//  W  larger K: warps own private sums; per chunk of 32 x VEC pixels the warp adds each class
//     present by one butterfly. 4 warps a block, or 2 or 1 where the GPU's shared memory holds
//     no more (K up to about 6000 at 4 warps and 227 KiB, 18000 at 1 warp).
// Both sum x - pivot (class_sums_blocks.cuh) and count their own pixels, for the float64 write.
#include "class_sums_blocks.cuh"
#include "class_sums_fold.cuh"

namespace idd_ops {
namespace class_sums_cuda {

// The rows of a block's kTile channels (a tile past C re-reads the last channel and drops it).
template <typename scalar_t>
__device__ __forceinline__ void tile_rows(const BlockWork& w, int c0, const scalar_t* (&rows)[kTile],
                                          at::opmath_type<scalar_t> (&pivot)[kTile]) {
#pragma unroll
  for (int t = 0; t < kTile; ++t) {
    rows[t] = static_cast<const scalar_t*>(w.j.feats) +
              (static_cast<int64_t>(w.b) * w.j.C + min(c0 + t, w.j.C - 1)) * w.j.HW;
    pivot[t] = pivot_of(rows[t][0]);
  }
}

// The float64 sum of class k, channel c of the block: its sum of x - pivot plus n * pivot.
template <typename scalar_t>
__device__ __forceinline__ void write_nchw_sum(const BlockWork& w, int K, int k, int c, at::opmath_type<scalar_t> v,
                                               int n) {
  const scalar_t* row = static_cast<const scalar_t*>(w.j.feats) + (static_cast<int64_t>(w.b) * w.j.C + c) * w.j.HW;
  block_sums(w, K)[static_cast<int64_t>(k) * w.j.C + c] = unpivot(v, n, pivot_of(row[0]));
}

// P: thread-private sums priv[k][t][thread] (conflict-free: a warp's lanes hit 32 consecutive
// words). The block's pass, for sums_private_kernel and its folded twin.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void private_pass(const SumsJobs& jobs) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = jobs.K, tid = threadIdx.x;
  acc_t* priv = reinterpret_cast<acc_t*>(smem);
  int* cnt = reinterpret_cast<int*>(priv + K * kTile * kPrivateThreads);
  const BlockWork w = block_work(jobs);
  const int c0 = w.tile * kTile;
  for (int e = tid; e < K * kTile * kPrivateThreads; e += kPrivateThreads) priv[e] = acc_t(0);
  for (int e = tid; e < K; e += kPrivateThreads) cnt[e] = 0;
  __syncthreads();

  const scalar_t* rows[kTile];
  acc_t pivot[kTile];
  tile_rows(w, c0, rows, pivot);
  const int16_t* slot = w.j.slots + static_cast<int64_t>(w.b) * w.j.HW;
  acc_t run[kTile] = {};
  int cur = -1, n = 0;
  auto flush = [&]() {
    if (cur < 0) return;
#pragma unroll
    for (int t = 0; t < kTile; ++t) priv[(cur * kTile + t) * kPrivateThreads + tid] += run[t];
    atomicAdd(&cnt[cur], n);  // integers: the same total in any order
  };
  // p0 and p1 are multiples of VEC (VEC > 1 only when HW is), so every vector is whole. The
  // loads of kStepsAhead steps go out before any is added: the adds branch on the slots, and a
  // load the compiler cannot move above a branch would wait alone for its memory round trip.
  constexpr int kStep = kPrivateThreads * VEC;
  for (int p0 = w.p0 + tid * VEC; p0 < w.p1; p0 += kStepsAhead * kStep) {
    Vec<int16_t, VEC> s[kStepsAhead];
    Vec<scalar_t, VEC> x[kStepsAhead][kTile];
#pragma unroll
    for (int u = 0; u < kStepsAhead; ++u) {
      if (p0 + u * kStep >= w.p1) continue;
      s[u] = load_vec<int16_t, VEC>(slot + p0 + u * kStep);
#pragma unroll
      for (int t = 0; t < kTile; ++t) x[u][t] = load_vec<scalar_t, VEC>(rows[t] + p0 + u * kStep);
    }
#pragma unroll
    for (int u = 0; u < kStepsAhead; ++u) {
      if (p0 + u * kStep >= w.p1) break;
#pragma unroll
      for (int i = 0; i < VEC; ++i) {
        if (s[u].v[i] != cur) {  // every slot value starts a run here or continues a checked one
          check_slot(s[u].v[i], K);
          flush();
          cur = s[u].v[i];
          n = 0;
#pragma unroll
          for (int t = 0; t < kTile; ++t) run[t] = acc_t(0);
        }
        ++n;
#pragma unroll
        for (int t = 0; t < kTile; ++t) run[t] += static_cast<acc_t>(x[u][t].v[i]) - pivot[t];
      }
    }
  }
  flush();
  __syncthreads();

  const int lane = tid % 32;
  for (int r = tid / 32; r < K * kTile; r += kPrivateThreads / 32) {  // one warp per (class, channel)
    const acc_t* row = priv + r * kPrivateThreads;
    acc_t v = acc_t(0);
#pragma unroll
    for (int i = 0; i < kPrivateThreads / 32; ++i) v += row[i * 32 + lane];
    v = warp_sum(v);
    const int k = r / kTile, c = c0 + r % kTile;
    if (lane == 0 && c < w.j.C) write_nchw_sum<scalar_t>(w, K, k, c, v, cnt[k]);
  }
  if (w.tile == 0)
    for (int k = tid; k < K; k += kPrivateThreads) block_counts(w, K)[k] = cnt[k];
}

// W's step: adds v[t] of the lanes whose slot is k into the warp's sums of class k, for each
// class k present among the lanes (one butterfly per class and channel); `weight` pixels per lane.
template <typename acc_t>
__device__ __forceinline__ void add_warp_classes(int s, const acc_t (&v)[kTile], int weight, acc_t* priv, int* cnt,
                                                 int warps) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  unsigned pending = __ballot_sync(kFull, s >= 0);
  while (pending) {  // warp-uniform: every lane sees the same ballots
    const int k = __shfl_sync(kFull, s, __ffs(pending) - 1);
    const bool mine = s == k;
    const unsigned peers = __ballot_sync(kFull, mine);
    pending &= ~peers;
    acc_t r[kTile];
#pragma unroll
    for (int t = 0; t < kTile; ++t) r[t] = warp_sum(mine ? v[t] : acc_t(0));
    if (lane == 0) {
#pragma unroll
      for (int t = 0; t < kTile; ++t) priv[(k * warps + warp) * kTile + t] += r[t];
      atomicAdd(&cnt[k], weight * __popc(peers));
    }
  }
}

// W: warp-private sums priv[k][warp][t]; each warp walks its own contiguous share of the
// segment in chunks of 32 x VEC pixels. The block's pass, for sums_warp_kernel and its twin.
template <typename scalar_t, int VEC>
__device__ __forceinline__ void warp_pass(const SumsJobs& jobs) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem[];
  const int K = jobs.K, tid = threadIdx.x, lane = tid % 32, warp = tid / 32, warps = blockDim.x / 32;
  acc_t* priv = reinterpret_cast<acc_t*>(smem);
  int* cnt = reinterpret_cast<int*>(priv + K * warps * kTile);
  const BlockWork w = block_work(jobs);
  const int c0 = w.tile * kTile;
  for (int e = tid; e < K * warps * kTile; e += blockDim.x) priv[e] = acc_t(0);
  for (int e = tid; e < K; e += blockDim.x) cnt[e] = 0;
  __syncthreads();

  const scalar_t* rows[kTile];
  acc_t pivot[kTile];
  tile_rows(w, c0, rows, pivot);
  const int16_t* slot = w.j.slots + static_cast<int64_t>(w.b) * w.j.HW;
  constexpr int kChunk = 32 * VEC;
  const int share = ((w.p1 - w.p0 + warps - 1) / warps + kChunk - 1) / kChunk * kChunk;
  const int q0 = w.p0 + warp * share, q1 = min(w.p1, q0 + share);
  for (int qa = q0; qa < q1; qa += kStepsAhead * kChunk) {  // warp-uniform trip count
    Vec<int16_t, VEC> s[kStepsAhead];
    Vec<scalar_t, VEC> x[kStepsAhead][kTile];
#pragma unroll
    for (int u = 0; u < kStepsAhead; ++u) {  // loads first, so several are in flight (as in P)
      const int p = qa + u * kChunk + lane * VEC;
      if (p < q1) {  // q1 is a multiple of VEC: the vector is whole
        s[u] = load_vec<int16_t, VEC>(slot + p);
#pragma unroll
        for (int t = 0; t < kTile; ++t) x[u][t] = load_vec<scalar_t, VEC>(rows[t] + p);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          s[u].v[i] = -1;
#pragma unroll
          for (int t = 0; t < kTile; ++t) x[u][t].v[i] = scalar_t(0);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kStepsAhead; ++u) {
      if (qa + u * kChunk >= q1) break;  // warp-uniform
#pragma unroll
      for (int i = 0; i < VEC; ++i) check_slot(s[u].v[i], K);
      bool uniform = true;
#pragma unroll
      for (int i = 1; i < VEC; ++i) uniform = uniform && s[u].v[i] == s[u].v[0];
      acc_t v[kTile];
      if (__all_sync(kFull, uniform)) {  // street labels: each lane's VEC pixels share a class
#pragma unroll
        for (int t = 0; t < kTile; ++t) {
          v[t] = acc_t(0);
#pragma unroll
          for (int i = 0; i < VEC; ++i) v[t] += static_cast<acc_t>(x[u][t].v[i]) - pivot[t];
        }
        add_warp_classes(s[u].v[0], v, VEC, priv, cnt, warps);
      } else {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
#pragma unroll
          for (int t = 0; t < kTile; ++t) v[t] = static_cast<acc_t>(x[u][t].v[i]) - pivot[t];
          add_warp_classes(s[u].v[i], v, 1, priv, cnt, warps);
        }
      }
    }
  }
  __syncthreads();

  for (int e = tid; e < K * kTile; e += blockDim.x) {
    const int k = e / kTile, t = e % kTile, c = c0 + t;
    acc_t v = acc_t(0);
    for (int u = 0; u < warps; ++u) v += priv[(k * warps + u) * kTile + t];
    if (c < w.j.C) write_nchw_sum<scalar_t>(w, K, k, c, v, cnt[k]);
  }
  if (w.tile == 0)
    for (int k = tid; k < K; k += blockDim.x) block_counts(w, K)[k] = cnt[k];
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kPrivateThreads) sums_private_kernel(const SumsJobs jobs) {
  private_pass<scalar_t, VEC>(jobs);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarps * 32) sums_warp_kernel(const SumsJobs jobs) {
  warp_pass<scalar_t, VEC>(jobs);
}

// The next set's (class_sums_fold.cuh): the pass, then a split job's segments added by each
// tile's last block.
template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kPrivateThreads) sums_private_folded_kernel(const SumsJobs jobs, const Fold fold) {
  private_pass<scalar_t, VEC>(jobs);
  finish_split(jobs, kTile, fold);
}

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kWarps * 32) sums_warp_folded_kernel(const SumsJobs jobs, const Fold fold) {
  warp_pass<scalar_t, VEC>(jobs);
  finish_split(jobs, kTile, fold);
}

}  // namespace class_sums_cuda
}  // namespace idd_ops
