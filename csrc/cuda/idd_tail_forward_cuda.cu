// The fused IDD tail's forward on CUDA: class sums and counts of both networks -> loss, dist and
// stats in two launches (tile kernel + one-block finish; four with normalize), or behind
// IDD_OPS_CUDA_NEXT in one (the one-pass kernel, below; three with normalize). Host side and
// registration: idd_tail_cuda.cu; the two types sum_t / acc_t and the shared helpers: idd_tail.cuh;
// the Gram tiles: idd_tail_gram.cuh.
//
// Tile kernel, grid = B x (upper-triangle tile pairs of the K x K matrix), T x T tiles
// (T = 16 for K <= 64, 32 for K <= 256, else 64): each block stages the centred centroids of its
// row and column tiles in channel chunks (formed in sum_t, staged in acc_t), accumulates both
// networks' Gram tiles (4 x 4 entries a thread; with T < 64 the block's threads form
// S = 256 / (T^2 / 16) channel streams whose partial tiles are summed in a fixed order), forms
// the raw distances, writes them (and their mirror) to `dist`, and the tile's partial sums to
// row p of `stats`. The normaliser needs every tile of the image, so with "mean" two launches
// follow the finish kernel's m_s, m_t: the pairs kernel sums E^2 and E R_s per tile from dist,
// and the finish kernel runs again on those. Every reduction runs in a fixed order: the same
// bits on every run.
#include <algorithm>
#include <limits>

#include "../common/cuda_next.h"
#include "grid_tickets.cuh"
#include "idd_tail_gram.cuh"

namespace idd_ops {
namespace {

// R_ij from the Gram entry g and the squared norms; the composite's formulas and order.
template <typename acc_t>
__device__ acc_t raw_distance(int metric, acc_t g, acc_t ni, acc_t nj, acc_t eps) {
  if (metric == static_cast<int>(Metric::Cosine)) {
    const acc_t den = sqrt(ni * nj);
    return acc_t(1) - g / (den > eps ? den : eps);
  }
  acc_t d = (ni + nj) - acc_t(2) * g;
  d = d < acc_t(0) ? acc_t(0) : d;  // a NaN stays NaN, as clamp_min(0) keeps it
  return metric == static_cast<int>(Metric::Euclidean) ? sqrt(d) : d;
}

// Tile pair p = (ti, tj) of image b from both networks' Gram tiles gs, gt (stream 0's threads)
// and their norms and presence flags (rows, then columns): the raw distances (norms on the
// diagonal) into dist, the tile and off the diagonal its mirror, and the tile's partial sums
// into row p of stats. `pool`: the tile's staging memory; `dscratch`: kNumStats * kWarps doubles.
template <typename sum_t, typename acc_t, int T>
__device__ void tile_outputs(const TailForwardArgs<sum_t, acc_t>& args, int K, int64_t b, int p, int ti, int tj,
                             acc_t (&gs)[4][4], acc_t (&gt)[4][4], acc_t* pool, const acc_t (*norm)[2 * T],
                             const bool (*present)[2 * T], double* dscratch) {
  using Shape = TileShape<acc_t, T>;
  constexpr int R = Shape::R, Q = Shape::Q, LD = Shape::LD;
  const int i0 = ti * T, j0 = tj * T;
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
                if (!args.normalize) {  // with normalize E needs m_s, m_t: the pairs kernel's
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

// Bytes of a tile block's static shared memory (the staging pool, 1 / counts, both networks'
// norms and presence flags, block-reduction scratch), which must fit the default 48 KB.
template <typename sum_t, typename acc_t, int T>
constexpr size_t tile_shared_bytes() {
  return TileShape<acc_t, T>::kPool * sizeof(acc_t) + 2 * T * sizeof(sum_t) + 4 * T * sizeof(acc_t) + 4 * T +
         kNumStats * kWarps * 8 + kWarps * 4;
}

template <typename sum_t, typename acc_t, int T>
__global__ void __launch_bounds__(kThreads) idd_tail_forward_kernel(const TailForwardArgs<sum_t, acc_t> args) {
  static_assert(tile_shared_bytes<sum_t, acc_t, T>() <= 48 * 1024, "shared memory of the tail tile kernel");
  __shared__ __align__(16) unsigned char pool_bytes[TileShape<acc_t, T>::kPool * sizeof(acc_t)];
  __shared__ sum_t inv[2 * T];
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
  tile_gram<sum_t, acc_t, T>(args.net[0], b, K, i0, j0, shift, pool, inv, norm[0], present[0], iscratch, gs, 0,
                             args.net[0].C);
  tile_gram<sum_t, acc_t, T>(args.net[1], b, K, i0, j0, shift, pool, inv, norm[1], present[1], iscratch, gt, 0,
                             args.net[1].C);
  tile_outputs<sum_t, acc_t, T>(args, K, b, p, ti, tj, gs, gt, pool, norm, present, dscratch);
}

// normalize, after a first finish: tile p's sums of E^2 and E R_s over its pairs, with
// E = R_s / m_s - R_t / m_t in acc_t as the composite forms it, into kPartSss and kPartSst of
// row p. (Sums of R_s^2, R_s R_t and R_t^2 from the tiles gave the loss only as
// Sss / m_s^2 - 2 Sst / (m_s m_t) + Stt / m_t^2, whose terms cancel: with the student near its
// teacher, E ~ 1e-6 R, a float64 loss kept 3 digits.)
template <typename sum_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) idd_tail_pairs_kernel(const TailForwardArgs<sum_t, acc_t> args, int T) {
  __shared__ double dscratch[2 * kWarps];
  const int K = args.K, p = blockIdx.x % args.P;
  const int64_t b = blockIdx.x / args.P, KK = static_cast<int64_t>(K) * K;
  int ti, tj;
  tile_pair(p, args.nt, ti, tj);
  const double* own = args.stats + (b * (K + 1) + K) * kNumStats;
  const acc_t ms = static_cast<acc_t>(own[kStatStudentDivisor]), mt = static_cast<acc_t>(own[kStatTeacherDivisor]);
  const acc_t* rs_of = args.dist + b * 2 * KK;
  double sums[2] = {0, 0};
  for (int e = threadIdx.x; e < T * T; e += kThreads) {
    const int i = ti * T + e / T, j = tj * T + e % T;
    if (i < j && j < K && args.net[0].count(b, i) > 0 && args.net[0].count(b, j) > 0 && args.net[1].count(b, i) > 0 &&
        args.net[1].count(b, j) > 0) {
      const int64_t ij = static_cast<int64_t>(i) * K + j;
      const acc_t rs = rs_of[ij], d = rs / ms - rs_of[KK + ij] / mt;
      sums[0] += static_cast<double>(d * d);
      sums[1] += static_cast<double>(d * rs);
    }
  }
  block_sums(sums, dscratch);
  if (threadIdx.x == 0) {
    double* row = args.stats + (b * (K + 1) + p) * kNumStats;
    row[kPartSss] = sums[0];
    row[kPartSst] = sums[1];
  }
}

// One block: each image's tile partials (in tile order) -> its divisors, loss and backward
// values (row K of stats); then the batch reduction and the loss. Rows P..K-1, which no tile
// owns, are zeroed, so that every element of stats is written. With normalize it runs twice:
// the first gives the pairs kernel m_s and m_t (its loss, q and kappa are still 0).
// `dscratch`: 2 * kWarps doubles of shared memory, `totals`: 2.
template <typename loss_t>
__device__ void finish_images(double* __restrict__ stats, loss_t* __restrict__ loss, int64_t B, int K, int P,
                              bool normalize, double eps, int reduction, double* dscratch, double* totals) {
  const int64_t unowned = static_cast<int64_t>(K - P) * kNumStats;
  for (int64_t e = threadIdx.x; e < B * unowned; e += kThreads)
    stats[(e / unowned * (K + 1) + P) * kNumStats + e % unowned] = 0.0;
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
      q = t[kPartSst];
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
      loss[b] = static_cast<loss_t>(row[kStatLossSum] / own_pairs);
    } else {
      row[kStatPairScale] = reduction == static_cast<int>(Reduction::Sum) ? 1.0 : 1.0 / total_pairs;
    }
  }
  if (threadIdx.x == 0 && reduction != static_cast<int>(Reduction::None))
    loss[0] = static_cast<loss_t>(reduction == static_cast<int>(Reduction::Sum) ? totals[0] : totals[0] / total_pairs);
}

template <typename loss_t>
__global__ void __launch_bounds__(kThreads) idd_tail_finish_kernel(double* __restrict__ stats, loss_t* __restrict__ loss,
                                                                   int64_t B, int K, int P, bool normalize, double eps,
                                                                   int reduction) {
  __shared__ double dscratch[2 * kWarps];
  __shared__ double totals[2];
  finish_images(stats, loss, B, K, P, normalize, eps, reduction, dscratch, totals);
}

// IDD_OPS_CUDA_NEXT: the forward in one launch (with normalize its first pass; the pairs and
// finish kernels follow). Grid (B x P, Z). With Z > 1 block (tile, z) forms both networks' Gram
// partials over channel range z (split_grams) and the last of the tile's Z blocks to finish adds
// them in z order (gram_from_partials); with Z = 1 each block forms its tile's Grams whole. That
// block writes the tile's outputs as the tile kernel does, and the last tile to finish runs the
// finish kernel's body. counters (grid_tickets.cuh): one a tile, then one for the tiles. Every
// sum in a fixed order, whichever block comes last: the same bits on every run.
template <typename sum_t, typename acc_t, int T, typename loss_t>
__global__ void __launch_bounds__(kThreads)
    idd_tail_one_pass_kernel(const TailForwardArgs<sum_t, acc_t> args, acc_t* __restrict__ partials,
                             loss_t* __restrict__ loss, int64_t B, double eps, int reduction,
                             unsigned* __restrict__ counters) {
  static_assert(tile_shared_bytes<sum_t, acc_t, T>() + 3 * sizeof(double) <= 48 * 1024,
                "shared memory of the one-pass tail kernel");
  __shared__ __align__(16) unsigned char pool_bytes[TileShape<acc_t, T>::kPool * sizeof(acc_t)];
  __shared__ sum_t inv[2 * T];
  __shared__ acc_t norm[2][2 * T];
  __shared__ bool present[2][2 * T];
  __shared__ double dscratch[kNumStats * kWarps];
  __shared__ double totals[2];
  __shared__ int iscratch[kWarps];
  __shared__ bool last;
  acc_t* pool = reinterpret_cast<acc_t*>(pool_bytes);
  const int p = blockIdx.x % args.P, Z = gridDim.y;
  const int64_t b = blockIdx.x / args.P;
  int ti, tj;
  tile_pair(p, args.nt, ti, tj);
  const bool shift = args.metric != static_cast<int>(Metric::Cosine);
  acc_t gs[4][4], gt[4][4];
  if (Z > 1) {
    split_grams<sum_t, acc_t, T>(args, partials, b, ti, tj, static_cast<int>(blockIdx.y), Z, shift, pool, inv,
                                 norm[0], present[0], iscratch);
    if (!last_to_arrive(counters + blockIdx.x, Z, &last)) return;
    gram_from_partials<sum_t, acc_t, T>(args, partials, b, ti * T, tj * T, Z, norm, present, gs, gt);
  } else {
    tile_gram<sum_t, acc_t, T>(args.net[0], b, args.K, ti * T, tj * T, shift, pool, inv, norm[0], present[0],
                               iscratch, gs, 0, args.net[0].C);
    tile_gram<sum_t, acc_t, T>(args.net[1], b, args.K, ti * T, tj * T, shift, pool, inv, norm[1], present[1],
                               iscratch, gt, 0, args.net[1].C);
  }
  tile_outputs<sum_t, acc_t, T>(args, args.K, b, p, ti, tj, gs, gt, pool, norm, present, dscratch);
  if (!last_to_arrive(counters + gridDim.x, gridDim.x, &last)) return;
  finish_images(args.stats, loss, B, args.K, args.P, args.normalize, eps, reduction, dscratch, totals);
}

// IDD_OPS_CUDA_NEXT: the channel ranges a tile's Grams are split over, aiming at about 4 blocks
// per SM of an H100/H200 (kSplitBlocks): fewer tile blocks than that take
// Z = ceil(kSplitBlocks / tiles) ranges, at most one a staged chunk of the wider network's
// channels; 1 (no split) where that gives fewer than 2. T = 64 (K > 256) is not split: at large K
// its tile blocks are many already (272 at K=1000, B=2, two waves of one block an SM), and its
// partials (tiles x Z x 2 x 4224 values) would reach tens of MB.
constexpr int64_t kSplitBlocks = 512;

int gram_splits(int T, int64_t tiles, int64_t C, int CK) {
  if (T > 32) return 1;
  const int64_t z = std::min<int64_t>({(kSplitBlocks + tiles - 1) / tiles, (C + CK - 1) / CK, 65535});
  return z >= 2 ? static_cast<int>(z) : 1;
}

// The one-pass kernel for tile size T, the loss in its own dtype (float32 or float64) whatever
// the math's. The partials and counters, from the caching allocator and grid_ticket_counters,
// stay valid for the launches queued on this stream.
template <typename sum_t, typename acc_t, int T>
void launch_one_pass(const TailForwardArgs<sum_t, acc_t>& args, int64_t B, double eps, Reduction reduction,
                     at::Tensor& loss, const at::Tensor& dist, cudaStream_t stream) {
  const int64_t tiles = B * args.P;
  const int Z = gram_splits(T, tiles, std::max(args.net[0].C, args.net[1].C), TileShape<acc_t, T>::CK);
  const at::Tensor partials = Z > 1 ? at::empty({tiles, Z, 2, T * T + 2 * T}, dist.options()) : at::Tensor();
  acc_t* partials_ptr = Z > 1 ? partials.mutable_data_ptr<acc_t>() : nullptr;
  const at::Tensor counters = grid_ticket_counters(dist.device(), tiles + 1);
  auto* tickets = reinterpret_cast<unsigned*>(counters.mutable_data_ptr<int>());
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(Z));
  if (loss.scalar_type() == at::kDouble)
    idd_tail_one_pass_kernel<sum_t, acc_t, T, double><<<grid, kThreads, 0, stream>>>(
        args, partials_ptr, loss.mutable_data_ptr<double>(), B, eps, static_cast<int>(reduction), tickets);
  else
    idd_tail_one_pass_kernel<sum_t, acc_t, T, float><<<grid, kThreads, 0, stream>>>(
        args, partials_ptr, loss.mutable_data_ptr<float>(), B, eps, static_cast<int>(reduction), tickets);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename sum_t, typename acc_t, int T>
void launch_tiles(const TailForwardArgs<sum_t, acc_t>& args, int64_t B, cudaStream_t stream) {
  idd_tail_forward_kernel<sum_t, acc_t, T><<<static_cast<unsigned>(B * args.P), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int tile_size(int64_t K) { return K <= 64 ? 16 : (K <= 256 ? 32 : 64); }

}  // namespace

void idd_tail_fused_forward(const at::Tensor& student_sums, const at::Tensor& student_counts,
                            const at::Tensor& teacher_sums, const at::Tensor& teacher_counts, Metric metric,
                            bool normalize, double eps, Reduction reduction, at::Tensor& loss, at::Tensor& dist,
                            at::Tensor& stats) {
  const int64_t B = student_sums.size(0), K = student_sums.size(1);
  const int T = tile_size(K);
  const int nt = static_cast<int>((K + T - 1) / T), P = nt * (nt + 1) / 2;
  TORCH_CHECK(P <= K && B * P <= std::numeric_limits<int>::max(), "idd_tail: ", B, " x ", P,
              " tile blocks do not fit the grid");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool one_pass = cuda_next_enabled(NextGroup::idd_tail);
  dispatch_tail_types(student_sums.scalar_type(), dist.scalar_type(), "idd_tail", [&](auto sum_tag, auto acc_tag) {
    using sum_t = decltype(sum_tag);
    using acc_t = decltype(acc_tag);
    const TailForwardArgs<sum_t, acc_t> args{{sums_view<sum_t>(student_sums, student_counts),
                                              sums_view<sum_t>(teacher_sums, teacher_counts)},
                                             static_cast<int>(K), nt, P, static_cast<int>(metric), normalize,
                                             static_cast<acc_t>(eps), dist.mutable_data_ptr<acc_t>(),
                                             stats.mutable_data_ptr<double>()};
    if (one_pass) {
      if (T == 16)
        launch_one_pass<sum_t, acc_t, 16>(args, B, eps, reduction, loss, dist, stream);
      else if (T == 32)
        launch_one_pass<sum_t, acc_t, 32>(args, B, eps, reduction, loss, dist, stream);
      else
        launch_one_pass<sum_t, acc_t, 64>(args, B, eps, reduction, loss, dist, stream);
    } else if (T == 16) {
      launch_tiles<sum_t, acc_t, 16>(args, B, stream);
    } else if (T == 32) {
      launch_tiles<sum_t, acc_t, 32>(args, B, stream);
    } else {
      launch_tiles<sum_t, acc_t, 64>(args, B, stream);
    }
    for (int pass = one_pass ? 1 : 0; pass < (normalize ? 2 : 1); ++pass) {
      if (pass == 1) {
        idd_tail_pairs_kernel<sum_t, acc_t><<<static_cast<unsigned>(B * P), kThreads, 0, stream>>>(args, T);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
      // the loss in its own dtype (float32 or float64), whatever the math's
      if (loss.scalar_type() == at::kDouble)
        idd_tail_finish_kernel<double><<<1, kThreads, 0, stream>>>(stats.mutable_data_ptr<double>(),
                                                                   loss.mutable_data_ptr<double>(), B,
                                                                   static_cast<int>(K), P, normalize, eps,
                                                                   static_cast<int>(reduction));
      else
        idd_tail_finish_kernel<float><<<1, kThreads, 0, stream>>>(stats.mutable_data_ptr<double>(),
                                                                  loss.mutable_data_ptr<float>(), B,
                                                                  static_cast<int>(K), P, normalize, eps,
                                                                  static_cast<int>(reduction));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
}

}  // namespace idd_ops
