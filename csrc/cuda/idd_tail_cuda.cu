// The IDD tail on CUDA, fused: class sums and counts of both networks -> loss in two launches
// (tile kernel + one-block finish), backward in one. Selected by IDD_OPS_CUDA_NEXT=1
// (common/cuda_next.h) until a GPU has run it; otherwise, and for inputs it does not take
// (half sums, mixed dtypes, K > kMaxFusedClasses), the composite (composite/idd_tail.cpp) runs.
// The math, the centroid shift and the saved tensors: common/idd_tail.h.
//
// Forward, grid = B x (upper-triangle tile pairs of the K x K matrix), T x T tiles
// (T = 16 for K <= 64, 32 for K <= 256, else 64): each block stages the centroids of its row
// and column tiles in channel chunks, accumulates both networks' Gram tiles (4 x 4 entries a
// thread; with T < 64 the block's threads form S = 256 / (T^2 / 16) channel streams whose
// partial tiles are summed in a fixed order), forms the raw distances, writes them (and their
// mirror) to `dist`, and the tile's partial sums to `stats`. The normaliser needs every tile
// of the image, so with "mean" the tile sums R_s^2, R_s R_t and R_t^2 (in float64) rather
// than (R_s / m_s - R_t / m_t)^2; the finish kernel combines them once m_s, m_t are known.
// Every reduction runs in a fixed order: the same bits on every run.
#include <torch/library.h>

#include <limits>

#include "../common/cuda_next.h"
#include "../common/idd_tail.h"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

// The fused path takes K up to this (the tile partials must fit in stats' K rows: P(K) <= K).
constexpr int64_t kMaxFusedClasses = 4096;
constexpr int kWarps = kThreads / 32;
constexpr unsigned kFullMask = 0xffffffffu;

// Read-only view of one network's sums [B, K, C] (any strides) and counts [B, K].
template <typename acc_t>
struct SumsView {
  const acc_t* sums;
  int64_t sb, sk, sc;
  const int64_t* counts;
  int64_t nb, nk;
  int64_t C;

  __device__ acc_t sum(int64_t b, int64_t k, int64_t c) const { return __ldg(sums + b * sb + k * sk + c * sc); }
  __device__ int64_t count(int64_t b, int64_t k) const { return __ldg(counts + b * nb + k * nk); }
  // c_k = sum_k / count_k through the reciprocal, as the composite (0 for an absent class)
  __device__ acc_t centroid(int64_t b, int64_t k, int64_t c) const {
    const int64_t n = count(b, k);
    return n > 0 ? sum(b, k, c) * (acc_t(1) / static_cast<acc_t>(n)) : acc_t(0);
  }
};

template <typename acc_t>
SumsView<acc_t> sums_view(const at::Tensor& sums, const at::Tensor& counts) {
  return {sums.const_data_ptr<acc_t>(), sums.stride(0), sums.stride(1), sums.stride(2),
          counts.const_data_ptr<int64_t>(), counts.stride(0), counts.stride(1), sums.size(2)};
}

// The first class k < K with count > 0 (K if none), for every thread of the block. Calls
// __syncthreads: every thread must reach it. `scratch`: kWarps ints of shared memory.
template <typename acc_t>
__device__ int first_present(const SumsView<acc_t>& v, int64_t b, int K, int* scratch) {
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

// R_ij from the Gram entry g and the squared norms; the composite's formulas and order.
template <typename acc_t>
__device__ acc_t raw_distance(int metric, acc_t g, acc_t ni, acc_t nj, acc_t eps) {
  if (metric == static_cast<int>(Metric::Cosine)) {
    const acc_t den = sqrt(ni * nj);
    return acc_t(1) - g / (den > eps ? den : eps);
  }
  acc_t d = (ni + nj) - acc_t(2) * g;
  d = d > acc_t(0) ? d : acc_t(0);
  return metric == static_cast<int>(Metric::Euclidean) ? sqrt(d) : d;
}

// Tile pair p (0 <= p < nt (nt + 1) / 2) -> (ti, tj), ti <= tj, row-major over the upper triangle.
__device__ inline void tile_pair(int p, int nt, int& ti, int& tj) {
  ti = 0;
  while (p >= nt - ti) {
    p -= nt - ti;
    ++ti;
  }
  tj = ti + p;
}

template <typename acc_t>
struct TailForwardArgs {
  SumsView<acc_t> net[2];  // student, teacher
  int K, nt, P;            // classes, tiles a side, tile pairs an image
  int metric;
  bool normalize;
  acc_t eps;
  acc_t* dist;    // [B, 2, K, K]
  double* stats;  // [B, K + 1, kNumStats]
};

// Shared-memory plan of the forward tile kernel for tile size T and accumulation type acc_t.
template <typename acc_t, int T>
struct TileShape {
  static constexpr int R = T / 4;             // stride between a thread's 4 rows (and 4 columns)
  static constexpr int Q = T * T / 16;        // threads of one channel stream
  static constexpr int S = kThreads / Q;      // channel streams
  // channels a staged chunk: 4096 values (16 loads a thread in flight), in the pool that the
  // stream reduction or the output tile needs anyway
  static constexpr int CK = T == 16 ? 128 : (T == 32 ? 64 : 32);
  static constexpr int kPerThread = 2 * T * CK / kThreads;  // staged values a thread
  static constexpr int LD = T + 1;            // padded row of the staged and tile arrays
  static constexpr int NN = (2 * T + Q - 1) / Q;  // norms a thread accumulates
  static constexpr int kStage = 2 * CK * LD;
  static constexpr int kReduce = S > 1 ? S * (T * T + 2 * T) : 0;
  static constexpr int kTile = T * LD;
  static constexpr int kPool = kStage > kReduce ? (kStage > kTile ? kStage : kTile) : (kReduce > kTile ? kReduce : kTile);
  static_assert(kThreads % Q == 0 && S >= 1 && CK % S == 0 && (2 * T * CK) % kThreads == 0, "tile shape");
  // pool + inv + norms + flags + partial scratch, under the 48 KB of static shared memory
  static_assert(kPool * sizeof(acc_t) + 6 * T * sizeof(acc_t) + 4 * T + kNumStats * kWarps * 8 + 64 <= 48 * 1024,
                "shared memory of the tail tile kernel");
};

// One network's Gram tile rows [i0, i0+T) x columns [j0, j0+T) over all channels, with the
// squared norms of those rows and columns accumulated in the same order as the Gram entries
// (so identical centroids give R_ij = 0 exactly). The totals are in `acc` of stream 0's threads
// and in norm[0, 2T) (rows, then columns); present[0, 2T) marks present classes. Calls
// __syncthreads throughout: every thread must reach it.
template <typename acc_t, int T>
__device__ void tile_gram(const SumsView<acc_t>& v, int64_t b, int K, int i0, int j0, bool shift, acc_t* pool,
                          acc_t* inv, acc_t* norm, bool* present, int* iscratch, acc_t (&acc)[4][4]) {
  using Shape = TileShape<acc_t, T>;
  constexpr int R = Shape::R, Q = Shape::Q, S = Shape::S, CK = Shape::CK, LD = Shape::LD, NN = Shape::NN;
  const int tid = threadIdx.x, s = tid / Q, q = tid % Q, tx = q % R, ty = q / R;
  const bool diag_tile = i0 == j0;
  const int anchor = shift ? first_present(v, b, K, iscratch) : K;
  const acc_t inv_anchor = anchor < K ? acc_t(1) / static_cast<acc_t>(v.count(b, anchor)) : acc_t(0);
  for (int l = tid; l < 2 * T; l += kThreads) {
    const int row = l < T ? i0 + l : j0 + l - T;
    const int64_t n = row < K ? v.count(b, row) : 0;
    inv[l] = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
    present[l] = n > 0;
  }
  __syncthreads();

  acc_t* sI = pool;                                // [CK][LD] rows of the row tile
  acc_t* sJ = diag_tile ? pool : pool + CK * LD;   // [CK][LD] rows of the column tile
  const int rows = diag_tile ? T : 2 * T;
  acc_t nacc[NN];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int r2 = 0; r2 < 4; ++r2) acc[r][r2] = acc_t(0);
#pragma unroll
  for (int k = 0; k < NN; ++k) nacc[k] = acc_t(0);

  // Chunk c0's values of this thread, into registers: the next chunk's loads are in flight
  // while the current one is multiplied. Neighbouring threads read neighbouring channels.
  acc_t staged[Shape::kPerThread];
  const auto load_chunk = [&](int64_t c0) {
#pragma unroll
    for (int k = 0; k < Shape::kPerThread; ++k) {
      const int e = tid + k * kThreads, l = e / CK;
      const int row = l < T ? i0 + l : j0 + l - T;
      const int64_t c = c0 + e % CK;
      acc_t x = acc_t(0);
      if (e < rows * CK && row < K && c < v.C) {
        x = inv[l] != acc_t(0) ? v.sum(b, row, c) * inv[l] : acc_t(0);
        if (anchor < K) x -= v.sum(b, anchor, c) * inv_anchor;  // the anchor's centroid, as v.centroid
      }
      staged[k] = x;
    }
  };
  if (v.C > 0) load_chunk(0);
  for (int64_t c0 = 0; c0 < v.C; c0 += CK) {
#pragma unroll
    for (int k = 0; k < Shape::kPerThread; ++k) {
      const int e = tid + k * kThreads, l = e / CK, cc = e % CK;
      if (e < rows * CK) (l < T ? sI : sJ)[cc * LD + (l < T ? l : l - T)] = staged[k];
    }
    if (c0 + CK < v.C) load_chunk(c0 + CK);
    __syncthreads();
    for (int cc = s; cc < CK; cc += S) {
      acc_t a[4], bv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        a[r] = sI[cc * LD + ty + R * r];
        bv[r] = sJ[cc * LD + tx + R * r];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int r2 = 0; r2 < 4; ++r2) acc[r][r2] = fma(a[r], bv[r2], acc[r][r2]);
#pragma unroll
      for (int k = 0; k < NN; ++k) {
        const int n = q + Q * k;
        if (n < 2 * T) {
          const acc_t x = n < T ? sI[cc * LD + n] : sJ[cc * LD + n - T];
          nacc[k] = fma(x, x, nacc[k]);
        }
      }
    }
    __syncthreads();
  }

  if constexpr (S > 1) {  // streams' partial tiles and norms, summed in stream order
    acc_t* red = pool;                 // [S][T * T]
    acc_t* nred = pool + S * T * T;    // [S][2T]
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int r2 = 0; r2 < 4; ++r2) red[s * T * T + (ty + R * r) * T + tx + R * r2] = acc[r][r2];
#pragma unroll
    for (int k = 0; k < NN; ++k)
      if (q + Q * k < 2 * T) nred[s * 2 * T + q + Q * k] = nacc[k];
    __syncthreads();
    if (s == 0) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int r2 = 0; r2 < 4; ++r2) {
          const int e = (ty + R * r) * T + tx + R * r2;
          acc_t total = red[e];
          for (int s2 = 1; s2 < S; ++s2) total += red[s2 * T * T + e];
          acc[r][r2] = total;
        }
    }
    for (int n = tid; n < 2 * T; n += kThreads) {
      acc_t total = nred[n];
      for (int s2 = 1; s2 < S; ++s2) total += nred[s2 * 2 * T + n];
      norm[n] = total;
    }
  } else {
#pragma unroll
    for (int k = 0; k < NN; ++k)
      if (q + Q * k < 2 * T) norm[q + Q * k] = nacc[k];
  }
  __syncthreads();  // norms visible; pool free again
}

template <typename acc_t, int T>
__global__ void __launch_bounds__(kThreads) idd_tail_forward_kernel(const TailForwardArgs<acc_t> args) {
  using Shape = TileShape<acc_t, T>;
  constexpr int R = Shape::R, Q = Shape::Q, LD = Shape::LD;
  __shared__ __align__(16) unsigned char pool_bytes[Shape::kPool * sizeof(acc_t)];
  __shared__ acc_t inv[2 * T];
  __shared__ acc_t norm[2][2 * T];  // [network][rows, then columns]
  __shared__ bool present[2][2 * T];
  __shared__ double dscratch[kNumStats * kWarps];
  __shared__ int iscratch[kWarps];
  acc_t* pool = reinterpret_cast<acc_t*>(pool_bytes);

  const int K = args.K, p = blockIdx.x % args.P;
  const int64_t b = blockIdx.x / args.P;
  int ti, tj;
  tile_pair(p, args.nt, ti, tj);
  const int i0 = ti * T, j0 = tj * T;
  const bool shift = args.metric != static_cast<int>(Metric::Cosine);
  acc_t gs[4][4], gt[4][4];
  tile_gram<acc_t, T>(args.net[0], b, K, i0, j0, shift, pool, inv, norm[0], present[0], iscratch, gs);
  tile_gram<acc_t, T>(args.net[1], b, K, i0, j0, shift, pool, inv, norm[1], present[1], iscratch, gt);

  // Raw distances (norms on the diagonal) and the tile's partial sums, on stream 0's threads.
  const int tid = threadIdx.x, q = tid % Q, tx = q % R, ty = q / R;
  double part[kNumStats] = {};
  if (tid < Q) {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int r2 = 0; r2 < 4; ++r2) {
        const int li = ty + R * r, lj = tx + R * r2, i = i0 + li, j = j0 + lj;
        acc_t rs = acc_t(0), rt = acc_t(0);
        if (i < K && j < K) {
          if (i == j) {
            rs = norm[0][li];
            rt = norm[1][li];
          } else {
            const bool vs = present[0][li] && present[0][T + lj], vt = present[1][li] && present[1][T + lj];
            if (vs) rs = raw_distance(args.metric, gs[r][r2], norm[0][li], norm[0][T + lj], args.eps);
            if (vt) rt = raw_distance(args.metric, gt[r][r2], norm[1][li], norm[1][T + lj], args.eps);
            if (i < j) {
              if (vs) part[kPartSumRs] += rs, part[kPartCountS] += 1;
              if (vt) part[kPartSumRt] += rt, part[kPartCountT] += 1;
              if (vs && vt) {
                part[kPartPairs] += 1;
                const double ds = rs, dt = rt;
                if (args.normalize) {
                  part[kPartSss] += ds * ds;
                  part[kPartSst] += ds * dt;
                  part[kPartStt] += dt * dt;
                } else {
                  const double e = rs - rt;  // E in acc_t, as the composite
                  part[kPartSss] += e * e;
                }
              }
            }
          }
        }
        gs[r][r2] = rs;
        gt[r][r2] = rt;
      }
  }

  // Both matrices through a shared tile: the tile and, off the diagonal, its mirror, each
  // written along rows of dist.
  for (int net = 0; net < 2; ++net) {
    if (tid < Q) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int r2 = 0; r2 < 4; ++r2) pool[(ty + R * r) * LD + tx + R * r2] = net == 0 ? gs[r][r2] : gt[r][r2];
    }
    __syncthreads();
    acc_t* out = args.dist + (b * 2 + net) * static_cast<int64_t>(K) * K;
    for (int e = tid; e < T * T; e += kThreads) {
      const int li = e / T, lj = e % T;
      if (i0 + li < K && j0 + lj < K) out[static_cast<int64_t>(i0 + li) * K + j0 + lj] = pool[li * LD + lj];
    }
    if (ti != tj) {
      for (int e = tid; e < T * T; e += kThreads) {
        const int lj = e / T, li = e % T;
        if (i0 + li < K && j0 + lj < K) out[static_cast<int64_t>(j0 + lj) * K + i0 + li] = pool[li * LD + lj];
      }
    }
    __syncthreads();
  }

  block_sums(part, dscratch);
  if (tid == 0) {
    double* row = args.stats + (b * (K + 1) + p) * kNumStats;
#pragma unroll
    for (int k = 0; k < kNumStats; ++k) row[k] = part[k];
  }
}

// One block: each image's tile partials (in tile order) -> its divisors, loss and backward
// values (row K of stats); then the batch reduction and the loss.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) idd_tail_finish_kernel(double* __restrict__ stats, acc_t* __restrict__ loss,
                                                                   int64_t B, int K, int P, bool normalize, double eps,
                                                                   int reduction) {
  __shared__ double dscratch[2 * kWarps];
  __shared__ double totals[2];
  double sums[2] = {0, 0};  // this thread's images: loss sums, pairs
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    double t[kNumStats] = {};
    for (int p = 0; p < P; ++p)
#pragma unroll
      for (int k = 0; k < kNumStats; ++k) t[k] += stats[(b * (K + 1) + p) * kNumStats + k];
    double ms = 1, mt = 1, loss_sum = t[kPartSss], q = 0, kappa = 0;
    if (normalize) {
      const double mean_s = t[kPartSumRs] / fmax(t[kPartCountS], 1.0), mean_t = t[kPartSumRt] / fmax(t[kPartCountT], 1.0);
      ms = t[kPartCountS] > 0 ? fmax(mean_s, eps) : 1.0;
      mt = t[kPartCountT] > 0 ? fmax(mean_t, eps) : 1.0;
      loss_sum = fmax(t[kPartSss] / (ms * ms) - 2 * t[kPartSst] / (ms * mt) + t[kPartStt] / (mt * mt), 0.0);
      q = t[kPartSss] / ms - t[kPartSst] / mt;
      const bool clamped = t[kPartCountS] == 0 || mean_s <= eps;
      kappa = clamped ? 0.0 : q / (ms * t[kPartCountS]);
    }
    double* row = stats + (b * (K + 1) + K) * kNumStats;
    row[kStatStudentDivisor] = ms;
    row[kStatTeacherDivisor] = mt;
    row[kStatKappa] = kappa;
    row[kStatLossSum] = loss_sum;
    row[kStatPairs] = t[kPartPairs];
    row[kStatQ] = q;
    row[kStatStudentEntries] = t[kPartCountS];
    sums[0] += loss_sum;
    sums[1] += t[kPartPairs];
  }
  block_sums(sums, dscratch);
  if (threadIdx.x == 0) {
    totals[0] = sums[0];
    totals[1] = sums[1];
  }
  __syncthreads();
  const double total_pairs = fmax(totals[1], 1.0);
  for (int64_t b = threadIdx.x; b < B; b += kThreads) {
    double* row = stats + (b * (K + 1) + K) * kNumStats;
    const double own_pairs = fmax(row[kStatPairs], 1.0);
    if (reduction == static_cast<int>(Reduction::None)) {
      row[kStatPairScale] = 1.0 / own_pairs;
      loss[b] = static_cast<acc_t>(row[kStatLossSum] / own_pairs);
    } else {
      row[kStatPairScale] = reduction == static_cast<int>(Reduction::Sum) ? 1.0 : 1.0 / total_pairs;
    }
  }
  if (threadIdx.x == 0 && reduction != static_cast<int>(Reduction::None))
    loss[0] = static_cast<acc_t>(reduction == static_cast<int>(Reduction::Sum) ? totals[0] : totals[0] / total_pairs);
}

// ---- backward --------------------------------------------------------------------------

constexpr int kBwdRows = 64;   // classes i a block
constexpr int kBwdCols = 64;   // channels a block
constexpr int kBwdInner = 16;  // classes j a step

template <typename acc_t>
struct TailBackwardArgs {
  SumsView<acc_t> student;
  const int64_t* counts_t;
  int64_t tb, tk;
  const acc_t* dist;    // [B, 2, K, K]
  const double* stats;  // [B, K + 1, kNumStats]
  const acc_t* grad;
  int64_t grad_stride;  // 0 for a reduced loss's one value
  int K, tiles_i, tiles_c, metric;
  acc_t eps;
  acc_t* out;  // [B, K, C]
};

// grad_sum[b, i, c] = (rowsum_j a_ij x_i[c] + sum_j b_ij x_j[c]) / count_i for a 64 x 64 block
// of (i, c), x the shifted centroids; the coefficients {a, b} are formed per (i, j) from dist
// and the image's row of stats (idd_tail_backward_composite's formulas) as the j loop goes.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads) idd_tail_backward_kernel(const TailBackwardArgs<acc_t> args) {
  __shared__ acc_t sX[kBwdInner][kBwdCols];  // x_j[c] of this step's classes
  __shared__ acc_t sB[kBwdInner][kBwdRows];  // b_ij, by j
  __shared__ acc_t sRowA[kThreads / kBwdRows][kBwdRows];
  __shared__ acc_t sShift[kBwdCols], sInv[kBwdRows], sNorm[kBwdRows];
  __shared__ bool sPs[kBwdRows], sPt[kBwdRows];
  __shared__ int iscratch[kWarps];
  const SumsView<acc_t>& v = args.student;
  const int K = args.K, tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  const int ct = blockIdx.x % args.tiles_c, it = (blockIdx.x / args.tiles_c) % args.tiles_i;
  const int64_t b = blockIdx.x / (static_cast<int64_t>(args.tiles_c) * args.tiles_i);
  const int i0 = it * kBwdRows;
  const int64_t c0 = static_cast<int64_t>(ct) * kBwdCols;
  const int64_t KK = static_cast<int64_t>(K) * K;
  const acc_t* rs_of = args.dist + b * 2 * KK;
  const acc_t* rt_of = rs_of + KK;

  const double* row = args.stats + (b * (K + 1) + K) * kNumStats;
  const acc_t ms = static_cast<acc_t>(row[kStatStudentDivisor]), mt = static_cast<acc_t>(row[kStatTeacherDivisor]);
  const acc_t kappa = static_cast<acc_t>(row[kStatKappa]);
  const acc_t alpha = acc_t(2) * args.grad[b * args.grad_stride] * static_cast<acc_t>(row[kStatPairScale]) / ms;
  const bool cosine = args.metric == static_cast<int>(Metric::Cosine);

  const int anchor = cosine ? K : first_present(v, b, K, iscratch);
  if (tid < kBwdCols) {
    const int64_t c = c0 + tid;
    sShift[tid] = anchor < K && c < v.C ? v.centroid(b, anchor, c) : acc_t(0);
  } else if (tid < kBwdCols + kBwdRows) {
    const int li = tid - kBwdCols, i = i0 + li;
    const int64_t n = i < K ? v.count(b, i) : 0;
    sInv[li] = n > 0 ? acc_t(1) / static_cast<acc_t>(n) : acc_t(0);
    sPs[li] = n > 0;
    sPt[li] = i < K && __ldg(args.counts_t + b * args.tb + i * args.tk) > 0;
    sNorm[li] = i < K ? rs_of[static_cast<int64_t>(i) * K + i] : acc_t(0);
  }
  __syncthreads();

  acc_t acc[4][4];
#pragma unroll
  for (int r = 0; r < 4; ++r)
#pragma unroll
    for (int r2 = 0; r2 < 4; ++r2) acc[r][r2] = acc_t(0);
  const int li = tid % kBwdRows, i = i0 + li;  // this thread's coefficient row
  acc_t row_a = acc_t(0);
  for (int j0 = 0; j0 < K; j0 += kBwdInner) {
    for (int e = tid; e < kBwdInner * kBwdCols; e += kThreads) {
      const int jj = e / kBwdCols, cc = e % kBwdCols, j = j0 + jj;
      const int64_t c = c0 + cc;
      sX[jj][cc] = j < K && c < v.C ? v.centroid(b, j, c) - sShift[cc] : acc_t(0);
    }
#pragma unroll
    for (int k = 0; k < kBwdInner / (kThreads / kBwdRows); ++k) {
      const int jj = tid / kBwdRows + (kThreads / kBwdRows) * k, j = j0 + jj;
      acc_t a = acc_t(0), bc = acc_t(0);
      if (i < K && j < K && i != j && sPs[li] && v.count(b, j) > 0) {
        // dist is symmetric: row j, column i reads along a row for neighbouring i
        const acc_t rs = rs_of[static_cast<int64_t>(j) * K + i], rt = rt_of[static_cast<int64_t>(j) * K + i];
        const bool pair = sPt[li] && __ldg(args.counts_t + b * args.tb + j * args.tk) > 0;
        const acc_t w = alpha * ((pair ? rs / ms - rt / mt : acc_t(0)) - kappa);
        if (args.metric == static_cast<int>(Metric::Euclidean)) {
          a = rs > acc_t(0) ? w / rs : acc_t(0);
          bc = -a;
        } else if (args.metric == static_cast<int>(Metric::SqEuclidean)) {
          a = acc_t(2) * w;
          bc = -a;
        } else {
          const acc_t ni = sNorm[li], prod = sqrt(ni * rs_of[static_cast<int64_t>(j) * K + j]);
          a = prod > args.eps ? w * (acc_t(1) - rs) / ni : acc_t(0);
          bc = -w / (prod > args.eps ? prod : args.eps);
        }
      }
      sB[jj][li] = bc;
      row_a += a;
    }
    __syncthreads();
#pragma unroll
    for (int jj = 0; jj < kBwdInner; ++jj) {
      acc_t av[4], xv[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        av[r] = sB[jj][ty + 16 * r];
        xv[r] = sX[jj][tx + 16 * r];
      }
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int r2 = 0; r2 < 4; ++r2) acc[r][r2] = fma(av[r], xv[r2], acc[r][r2]);
    }
    __syncthreads();
  }
  sRowA[tid / kBwdRows][li] = row_a;
  __syncthreads();
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int lr = ty + 16 * r, gi = i0 + lr;
    acc_t rowsum = sRowA[0][lr];
    for (int part = 1; part < kThreads / kBwdRows; ++part) rowsum += sRowA[part][lr];
#pragma unroll
    for (int r2 = 0; r2 < 4; ++r2) {
      const int64_t c = c0 + tx + 16 * r2;
      if (gi < K && c < v.C) {
        const acc_t xi = v.centroid(b, gi, c) - sShift[tx + 16 * r2];
        args.out[(b * K + gi) * v.C + c] = (acc[r][r2] + rowsum * xi) * sInv[lr];
      }
    }
  }
}

// ---- host side -------------------------------------------------------------------------

int tile_size(int64_t K) { return K <= 64 ? 16 : (K <= 256 ? 32 : 64); }

bool fused_takes(const at::Tensor& student_sums, const at::Tensor& teacher_sums) {
  const auto t = student_sums.scalar_type();
  return cuda_next_enabled() && (t == at::kFloat || t == at::kDouble) && teacher_sums.scalar_type() == t &&
         student_sums.size(0) > 0 && student_sums.size(1) > 0 && student_sums.size(1) <= kMaxFusedClasses;
}

template <typename acc_t, int T>
void launch_forward(const TailForwardArgs<acc_t>& args, int64_t B, cudaStream_t stream) {
  idd_tail_forward_kernel<acc_t, T><<<static_cast<unsigned>(B * args.P), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> idd_tail_cuda(const at::Tensor& student_sums,
                                                             const at::Tensor& student_counts,
                                                             const at::Tensor& teacher_sums,
                                                             const at::Tensor& teacher_counts, c10::string_view metric_name,
                                                             bool normalize, double eps,
                                                             c10::string_view reduction_name,
                                                             std::optional<at::ScalarType> dtype) {
  // the fused kernel computes in the sums' dtype
  if (!fused_takes(student_sums, teacher_sums) || tail_dtype(student_sums, dtype) != student_sums.scalar_type())
    return idd_tail_composite(student_sums, student_counts, teacher_sums, teacher_counts, metric_name, normalize, eps,
                              reduction_name, dtype);
  check_idd_tail_inputs(student_sums, student_counts, teacher_sums, teacher_counts, eps);
  const Metric metric = metric_code(metric_name);
  const Reduction reduction = reduction_code(reduction_name);
  const c10::cuda::CUDAGuard guard(student_sums.device());
  const int64_t B = student_sums.size(0), K = student_sums.size(1);
  const int T = tile_size(K);
  const int nt = static_cast<int>((K + T - 1) / T), P = nt * (nt + 1) / 2;
  TORCH_CHECK(P <= K && B * P <= std::numeric_limits<int>::max(), "idd_tail: ", B, " x ", P,
              " tile blocks do not fit the grid");
  const auto opts = student_sums.options();
  at::Tensor loss = reduction == Reduction::None ? at::empty({B}, opts) : at::empty({}, opts);
  at::Tensor dist = at::empty({B, 2, K, K}, opts);
  at::Tensor stats = at::empty({B, K + 1, kNumStats}, opts.dtype(at::kDouble));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(student_sums.scalar_type(), "idd_tail_cuda", [&] {
    using acc_t = scalar_t;
    const TailForwardArgs<acc_t> args{{sums_view<acc_t>(student_sums, student_counts),
                                       sums_view<acc_t>(teacher_sums, teacher_counts)},
                                      static_cast<int>(K), nt, P, static_cast<int>(metric), normalize,
                                      static_cast<acc_t>(eps), dist.mutable_data_ptr<acc_t>(),
                                      stats.mutable_data_ptr<double>()};
    if (T == 16)
      launch_forward<acc_t, 16>(args, B, stream);
    else if (T == 32)
      launch_forward<acc_t, 32>(args, B, stream);
    else
      launch_forward<acc_t, 64>(args, B, stream);
    idd_tail_finish_kernel<acc_t><<<1, kThreads, 0, stream>>>(stats.mutable_data_ptr<double>(),
                                                              loss.mutable_data_ptr<acc_t>(), B, static_cast<int>(K), P,
                                                              normalize, eps, static_cast<int>(reduction));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, dist, stats};
}

at::Tensor idd_tail_backward_cuda(const at::Tensor& grad, const at::Tensor& student_sums,
                                  const at::Tensor& student_counts, const at::Tensor& teacher_counts,
                                  const at::Tensor& dist, const at::Tensor& stats, c10::string_view metric_name,
                                  bool normalize, double eps, c10::string_view reduction_name) {
  if (!fused_takes(student_sums, student_sums) || grad.scalar_type() != student_sums.scalar_type() ||
      dist.scalar_type() != student_sums.scalar_type())
    return idd_tail_backward_composite(grad, student_sums, student_counts, teacher_counts, dist, stats, metric_name,
                                       normalize, eps, reduction_name);
  const Reduction reduction = reduction_code(reduction_name);
  check_idd_tail_backward_inputs(grad, student_sums, student_counts, teacher_counts, dist, stats, eps, reduction);
  const Metric metric = metric_code(metric_name);
  const c10::cuda::CUDAGuard guard(student_sums.device());
  const int64_t B = student_sums.size(0), K = student_sums.size(1), C = student_sums.size(2);
  at::Tensor out = at::empty({B, K, C}, student_sums.options());
  const int tiles_i = static_cast<int>((K + kBwdRows - 1) / kBwdRows);
  const int64_t tiles_c = (C + kBwdCols - 1) / kBwdCols;
  if (C == 0) return out;
  TORCH_CHECK(B * tiles_i * tiles_c <= std::numeric_limits<int>::max(), "_idd_tail_backward: ", B * tiles_i * tiles_c,
              " blocks do not fit the grid");
  AT_DISPATCH_FLOATING_TYPES(student_sums.scalar_type(), "idd_tail_backward_cuda", [&] {
    using acc_t = scalar_t;
    const TailBackwardArgs<acc_t> args{sums_view<acc_t>(student_sums, student_counts),
                                       teacher_counts.const_data_ptr<int64_t>(),
                                       teacher_counts.stride(0),
                                       teacher_counts.stride(1),
                                       dist.const_data_ptr<acc_t>(),
                                       stats.const_data_ptr<double>(),
                                       grad.const_data_ptr<acc_t>(),
                                       reduction == Reduction::None ? grad.stride(0) : 0,
                                       static_cast<int>(K),
                                       tiles_i,
                                       static_cast<int>(tiles_c),
                                       static_cast<int>(metric),
                                       static_cast<acc_t>(eps),
                                       out.mutable_data_ptr<acc_t>()};
    idd_tail_backward_kernel<acc_t><<<static_cast<unsigned>(B * tiles_i * tiles_c), kThreads, 0,
                                      c10::cuda::getCurrentCUDAStream()>>>(args);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("idd_tail", &idd_tail_cuda);
  m.impl("_idd_tail_backward", &idd_tail_backward_cuda);
}

}  // namespace idd_ops
