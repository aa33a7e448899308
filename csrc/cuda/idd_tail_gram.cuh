#pragma once
// The IDD tail forward's Gram tiles (idd_tail_forward_cuda.cu): the tile pairs of the K x K
// matrix, the tile kernels' arguments, one tile pair's Gram over a range of channels staged
// through shared memory (tile_gram), and, for the one-pass kernel behind IDD_OPS_CUDA_NEXT, the
// Grams split over channel ranges (split_grams) and added back by the tile's last block
// (gram_from_partials).
#include "idd_tail.cuh"

namespace idd_ops {

// Tile pair p (0 <= p < nt (nt + 1) / 2) -> (ti, tj), ti <= tj, row-major over the upper triangle.
__device__ inline void tile_pair(int p, int nt, int& ti, int& tj) {
  ti = 0;
  while (p >= nt - ti) {
    p -= nt - ti;
    ++ti;
  }
  tj = ti + p;
}

template <typename sum_t, typename acc_t>
struct TailForwardArgs {
  SumsView<sum_t> net[2];  // student, teacher
  int K, nt, P;            // classes, tiles a side, tile pairs an image
  int metric;
  bool normalize;
  acc_t eps;
  acc_t* dist;    // [B, 2, K, K]
  double* stats;  // [B, K + 1, kNumStats]
};

// Channels of each split range of a network with C channels: ceil(C / Z) rounded up to whole
// staged chunks of CK, so that only the last range of each network is cut short.
__host__ __device__ inline int64_t channel_share(int64_t C, int Z, int CK) {
  const int64_t even = (C + Z - 1) / Z;
  return (even + CK - 1) / CK * CK;
}

// Shared-memory plan of the forward tile kernel for tile size T and compute type acc_t.
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
};

// One network's Gram tile rows [i0, i0+T) x columns [j0, j0+T) over channels [c_begin, c_end),
// with the squared norms of those rows and columns accumulated in the same order as the Gram
// entries (so identical centroids give R_ij = 0 exactly). The totals are in `acc` of stream 0's
// threads and in norm[0, 2T) (rows, then columns); present[0, 2T) marks present classes. Calls
// __syncthreads throughout: every thread must reach it.
template <typename sum_t, typename acc_t, int T>
__device__ void tile_gram(const SumsView<sum_t>& v, int64_t b, int K, int i0, int j0, bool shift, acc_t* pool,
                          sum_t* inv, acc_t* norm, bool* present, int* iscratch, acc_t (&acc)[4][4],
                          int64_t c_begin, int64_t c_end) {
  using Shape = TileShape<acc_t, T>;
  constexpr int R = Shape::R, Q = Shape::Q, S = Shape::S, CK = Shape::CK, LD = Shape::LD, NN = Shape::NN;
  const int tid = threadIdx.x, s = tid / Q, q = tid % Q, tx = q % R, ty = q / R;
  const bool diag_tile = i0 == j0;
  const int anchor = shift ? first_present(v, b, K, iscratch) : K;
  const sum_t inv_anchor = anchor < K ? v.inverse_count(b, anchor) : sum_t(0);
  for (int l = tid; l < 2 * T; l += kThreads) {
    const int row = l < T ? i0 + l : j0 + l - T;
    inv[l] = row < K ? v.inverse_count(b, row) : sum_t(0);
    present[l] = inv[l] != sum_t(0);
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
      sum_t x = sum_t(0);
      if (e < rows * CK && row < K && c < c_end) {
        x = v.centroid(b, row, c, inv[l]);
        if (anchor < K) x -= v.centroid(b, anchor, c, inv_anchor);
      }
      staged[k] = static_cast<acc_t>(x);  // centred in sum_t, rounded once
    }
  };
  if (c_begin < c_end) load_chunk(c_begin);
  for (int64_t c0 = c_begin; c0 < c_end; c0 += CK) {
#pragma unroll
    for (int k = 0; k < Shape::kPerThread; ++k) {
      const int e = tid + k * kThreads, l = e / CK, cc = e % CK;
      if (e < rows * CK) (l < T ? sI : sJ)[cc * LD + (l < T ? l : l - T)] = staged[k];
    }
    if (c0 + CK < c_end) load_chunk(c0 + CK);
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

// Partial z of network `net` for this block's tile pair in the split's partials: T^2 Gram entries
// (the tile's rows in order), then the 2T norms (rows, then columns).
template <int T, typename acc_t>
__device__ __forceinline__ acc_t* partial_of(acc_t* partials, int Z, int z, int net) {
  return partials + ((static_cast<int64_t>(blockIdx.x) * Z + z) * 2 + net) * (T * T + 2 * T);
}

// Entry e of network `net`'s Z partials, added in split order.
template <int T, typename acc_t>
__device__ __forceinline__ acc_t partials_sum(const acc_t* partials, int Z, int net, int e) {
  // loads cached in L2 only (ld.global.cg): other blocks of this launch wrote them, and the
  // read-only path the compiler may pick for const data is not kept coherent within a launch
  acc_t total = __ldcg(partial_of<T>(partials, Z, 0, net) + e);
  for (int z = 1; z < Z; ++z) total += __ldcg(partial_of<T>(partials, Z, z, net) + e);
  return total;
}

// IDD_OPS_CUDA_NEXT: range z of Z of each network's channels (channel_share) of tile pair
// (ti, tj) of image b, both networks' partial tiles and norms into `partials` (the one-pass
// kernel's [B x P, Z, 2, T^2 + 2T], partial_of), which the
// tile's last block adds in z order (gram_from_partials) where it would walk all C channels
// itself. Unsplit, at K = 19 the tile kernel is B x 3 blocks (24 at B = 8, on 132 SMs) each
// walking 2048 + 512 channels: 0.123 ms on the H200, 18 % of IDD's forward+backward, against
// about 0.02 ms of L2 reads. Shared memory as tile_gram's; calls __syncthreads throughout.
template <typename sum_t, typename acc_t, int T>
__device__ void split_grams(const TailForwardArgs<sum_t, acc_t>& args, acc_t* partials, int64_t b, int ti, int tj,
                            int z, int Z, bool shift, acc_t* pool, sum_t* inv, acc_t* norm, bool* present,
                            int* iscratch) {
  using Shape = TileShape<acc_t, T>;
  constexpr int R = Shape::R, Q = Shape::Q;
  const int tid = threadIdx.x, q = tid % Q, tx = q % R, ty = q / R;
  for (int net = 0; net < 2; ++net) {
    const SumsView<sum_t>& v = args.net[net];
    const int64_t share = channel_share(v.C, Z, Shape::CK);
    const int64_t c0 = z * share < v.C ? z * share : v.C, c1 = c0 + share < v.C ? c0 + share : v.C;
    acc_t acc[4][4];
    tile_gram<sum_t, acc_t, T>(v, b, args.K, ti * T, tj * T, shift, pool, inv, norm, present, iscratch, acc, c0, c1);
    acc_t* out = partial_of<T>(partials, Z, z, net);
    if (tid < Q) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int r2 = 0; r2 < 4; ++r2) out[(ty + R * r) * T + tx + R * r2] = acc[r][r2];
    }
    for (int n = tid; n < 2 * T; n += kThreads) out[T * T + n] = norm[n];
    __syncthreads();  // norm, inv and present become the next network's
  }
}

// The tile's Grams (stream 0's threads), norms and presence flags from the Z partials of
// split_grams, added in z order; as tile_gram leaves them.
template <typename sum_t, typename acc_t, int T>
__device__ void gram_from_partials(const TailForwardArgs<sum_t, acc_t>& args, const acc_t* partials, int64_t b,
                                   int i0, int j0, int Z, acc_t (*norm)[2 * T], bool (*present)[2 * T],
                                   acc_t (&gs)[4][4], acc_t (&gt)[4][4]) {
  using Shape = TileShape<acc_t, T>;
  constexpr int R = Shape::R, Q = Shape::Q;
  const int tid = threadIdx.x, q = tid % Q, tx = q % R, ty = q / R;
  for (int net = 0; net < 2; ++net) {
    acc_t(&g)[4][4] = net == 0 ? gs : gt;
    if (tid < Q) {
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int r2 = 0; r2 < 4; ++r2) g[r][r2] = partials_sum<T>(partials, Z, net, (ty + R * r) * T + tx + R * r2);
    }
    for (int n = tid; n < 2 * T; n += kThreads) {
      norm[net][n] = partials_sum<T>(partials, Z, net, T * T + n);
      const int row = n < T ? i0 + n : j0 + n - T;
      present[net][n] = row < args.K && args.net[net].count(b, row) > 0;
    }
  }
  __syncthreads();
}

}  // namespace idd_ops
