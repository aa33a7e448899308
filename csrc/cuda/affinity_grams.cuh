#pragma once
// SKD's kernels over C x C matrices (affinity_loss_cuda.cu runs them beside the GEMMs): the
// forward's Gram tail (the four inner products of differenced_affinity_sum, G_xd kept for the
// backward) and per-image means, and the backward's GEMM operands and u. Small next to the pixel
// passes (affinity_pivot.cuh, affinity_gradient.cuh): their cost is mostly their launches, which
// IDD_OPS_CUDA_NEXT=1 halves (the means in the tail's last block per image, and for
// _affinity_loss_sum their total in the last image's; the operands and u in one pass).
#include "affinity_pivot.cuh"
#include "cuda_utils.cuh"
#include "grid_tickets.cuh"

namespace idd_ops {
namespace affinity_cuda {

constexpr int kGramTile = 32;  // the Gram tail's square tiles, kGramTile a side

// The backward's GEMM operands of a chunk (affinity_gram_operands), in gemm_operand_t, from the
// kept G_ss and G_sd [k, Cs, Ct] (contiguous): g_sd [k, Cs, Cs] = G_sd (past Ct: G_ss, D's rows
// being S's own there) and g_st [k, Cs, Ct] = G_ss - G_sd (past Cs: -G_sd). A grid-stride loop
// over k * Cs * max(Cs, Ct).
template <typename acc_t, typename op_t>
__global__ void gram_operands_kernel(const acc_t* __restrict__ gss, const acc_t* __restrict__ gsd, int64_t k,
                                     int64_t Cs, int64_t Ct, op_t* __restrict__ g_sd, op_t* __restrict__ g_st) {
  const int64_t C = Cs > Ct ? Cs : Ct, n = k * Cs * C;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n;
       e += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = e % C, row = e / C;  // row = image * Cs + i
    const acc_t ss = j < Cs ? gss[row * Cs + j] : acc_t(0);
    const acc_t sd = j < Ct ? gsd[row * Ct + j] : ss;
    if (j < Cs) g_sd[row * Cs + j] = static_cast<op_t>(sd);
    if (j < Ct) g_st[row * Ct + j] = static_cast<op_t>(ss - sd);
  }
}

// IDD_OPS_CUDA_NEXT=1: gram_operands_kernel's operands side by side, a [k, Cs, Cs + Ct] =
// [g_sd | g_st], the left factor of the backward's one GEMM over the interleaved x and d
// (OperandRows), and pivot_u_kernel's u [k, Cs] from the same reads of the kept G_ss [k, Cs, Cs]
// and G_sd [k, Cs, Ct]: one launch where those were two, each operand and u the same bits as
// theirs (u's products added in pivot_u_kernel's order). A warp a row; grid (ceil(Cs / warps),
// k), kThreads threads.
template <typename acc_t, typename op_t>
__global__ void operands_u_kernel(const acc_t* __restrict__ g_ss, const acc_t* __restrict__ g_sd,
                                  const double* __restrict__ m_s, const double* __restrict__ m_d, int64_t Cs,
                                  int64_t Ct, op_t* __restrict__ a, double* __restrict__ u) {
  constexpr int kWarps = kThreads / 32;
  const int64_t b = blockIdx.y, i = static_cast<int64_t>(blockIdx.x) * kWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t C = Cs > Ct ? Cs : Ct;
  const double* md = m_d + b * C;
  const double* ms = m_s + b * Cs;
  double sum = 0;
  if (i < Cs) {
    const acc_t* ss = g_ss + (b * Cs + i) * Cs;
    const acc_t* sd = g_sd + (b * Cs + i) * Ct;
    op_t* row = a + (b * Cs + i) * (Cs + Ct);
    for (int64_t j = lane; j < Cs; j += 32) {
      const acc_t s = ss[j];
      sum += static_cast<double>(s) * md[j];
      row[j] = static_cast<op_t>(j < Ct ? sd[j] : s);
    }
    for (int64_t j = lane; j < Ct; j += 32) {
      const acc_t x = sd[j];
      sum += static_cast<double>(x) * ((j < Cs ? ms[j] : 0.0) - md[j]);
      row[Cs + j] = static_cast<op_t>((j < Cs ? ss[j] : acc_t(0)) - x);
    }
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (i < Cs && lane == 0) u[b * Cs + i] = sum;
}

// The four inner products of differenced_affinity_sum over one kGramTile x kGramTile tile
// (blockIdx.x of tiles * tiles) of one image's C x C grid, in float64, the block's sum returned
// to every thread; and the kept G_sd (its first Ct columns) on the tile's part of [Cs, Ct]. The
// image's g_ss [Cs, Cs], g_sd [Cs, C], g_dd [C, C] and kept [Cs, Ct], rows contiguous. The
// <G_sd, G_sd^T> term reads the mirror tile through shared memory (coalesced both ways).
// kThreads threads: thread t takes column t % kGramTile of its tile and every
// (kThreads / kGramTile)-th row from t / kGramTile.
template <typename acc_t>
__device__ __forceinline__ double gram_tile_sum(const acc_t* __restrict__ ss, const acc_t* __restrict__ sd,
                                                const acc_t* __restrict__ dd, acc_t* __restrict__ kept_b, int64_t Cs,
                                                int64_t Ct, int64_t C, acc_t (*mirror)[kGramTile + 1],
                                                double* scratch) {
  constexpr int kRowStep = kThreads / kGramTile;
  const int tx = threadIdx.x % kGramTile, ty = threadIdx.x / kGramTile;
  const int64_t tiles = (C + kGramTile - 1) / kGramTile;
  const int64_t i0 = (blockIdx.x / tiles) * kGramTile, j0 = (blockIdx.x % tiles) * kGramTile;
  const int64_t j = j0 + tx;
  const bool square = i0 < Cs && j0 < Cs;  // the tile meets G_ss: block-uniform
  if (square) {  // mirror[r][c] = G_sd[j0 + r, i0 + c]
    for (int r = ty; r < kGramTile; r += kRowStep) {
      const int64_t row = j0 + r, col = i0 + tx;
      mirror[r][tx] = row < Cs && col < Cs ? sd[row * C + col] : acc_t(0);
    }
  }
  __syncthreads();
  double sum = 0;
  for (int r = ty; r < kGramTile; r += kRowStep) {
    const int64_t i = i0 + r;
    if (i >= C || j >= C) continue;
    const double d = dd[i * C + j];
    sum += d * d;  // <G_dd, G_dd>
    if (i >= Cs) continue;
    const acc_t x = sd[i * C + j];
    sum -= 4 * d * static_cast<double>(x);  // <G_dd[:Cs], G_sd>
    const acc_t s = j < Cs ? ss[i * Cs + j] : acc_t(0);
    if (j < Cs) sum += 2 * (static_cast<double>(s) * d + static_cast<double>(x) * mirror[tx][r]);
    if (j < Ct) kept_b[i * Ct + j] = x;
  }
  return block_sum(sum, scratch);  // a fixed-order tree (cuda_utils.cuh)
}

// gram_tile_sum's sum into partials[b, tile], per tile of the chunk's g_ss [k, Cs, Cs], g_sd
// [k, Cs, C], g_dd [k, C, C] and kept [k, Cs, Ct] (contiguous). grid (tiles * tiles, k).
template <typename acc_t>
__global__ void gram_tail_kernel(const acc_t* __restrict__ g_ss, const acc_t* __restrict__ g_sd,
                                 const acc_t* __restrict__ g_dd, acc_t* __restrict__ kept, int64_t Cs, int64_t Ct,
                                 int64_t C, double* __restrict__ partials) {
  __shared__ acc_t mirror[kGramTile][kGramTile + 1];
  __shared__ double scratch[kThreads];
  const int64_t b = blockIdx.y;
  const double sum = gram_tile_sum(g_ss + b * Cs * Cs, g_sd + b * Cs * C, g_dd + b * C * C, kept + b * Cs * Ct, Cs,
                                   Ct, C, mirror, scratch);
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = sum;
}

// One image's mean: its partials [tiles] summed in a fixed order, plus the pivot's part
// P^2 alpha^2 + 2 P sum_i beta_i^2 (pivot_affinity_sum) from its beta [P] and alpha_parts
// [alpha_tiles], clamped at 0 (rounding), over the P * P entries, into *loss. A block of kThreads.
template <typename acc_t>
__device__ __forceinline__ void image_mean(const double* partials, int64_t tiles, const double* __restrict__ beta,
                                           const double* __restrict__ alpha_parts, int64_t alpha_tiles, int64_t P,
                                           double divisor, acc_t* __restrict__ loss, double* scratch) {
  double sum = 0, squares = 0;
  for (int64_t t = threadIdx.x; t < tiles; t += kThreads) sum += partials[t];
  for (int64_t p = threadIdx.x; p < P; p += kThreads) squares += beta[p] * beta[p];
  sum = block_sum(sum, scratch);
  squares = block_sum(squares, scratch);
  if (threadIdx.x == 0) {
    const double alpha = alpha_of(alpha_parts, alpha_tiles), pixels = P;
    sum += pixels * pixels * alpha * alpha + 2 * pixels * squares;
    *loss = static_cast<acc_t>((sum < 0 ? 0 : sum) / divisor);  // NaN stays NaN
  }
}

// Per-image means from partials [B, tiles], beta [B, P] and alpha_parts [B, alpha_tiles]. grid B.
template <typename acc_t>
__global__ void affinity_means_kernel(const double* __restrict__ partials, int64_t tiles,
                                      const double* __restrict__ beta, const double* __restrict__ alpha_parts,
                                      int64_t alpha_tiles, int64_t P, double divisor, acc_t* __restrict__ loss) {
  __shared__ double scratch[kThreads];
  const int64_t b = blockIdx.x;
  image_mean(partials + b * tiles, tiles, beta + b * P, alpha_parts + b * alpha_tiles, alpha_tiles, P, divisor,
             loss + b, scratch);
}

// _affinity_loss_sum's loss (IDD_OPS_CUDA_NEXT=1): every image's mean added in float64, in a
// fixed order, times `scale` (affinity_sum_scale), by the last image of the call's last chunk to
// finish; the earlier chunks' launches wrote their means before it.
template <typename acc_t>
struct BatchTotal {
  const acc_t* means;  // [batch]: not __restrict__, as other blocks of the launch write the chunk's
  int64_t batch;
  double scale;
  acc_t* total;           // 0-dim; null but in the last chunk's launch of a _affinity_loss_sum call
  unsigned* images_done;  // one counter at 0 (grid_ticket_counters)
};

// The chunk's Grams and means for IDD_OPS_CUDA_NEXT=1 (gram_tail_means_kernel): G_xd and G_dd as
// one GEMM's [k, Cs + C, C] (grams: x's rows then d's of the interleaved operand, times d^T),
// and each image's loss terms (beta, alpha_parts) and means, all of the chunk's images.
template <typename acc_t>
struct TailMeans {
  const acc_t* grams;                // [k, Cs + C, C]: G_xd [Cs, C] over G_dd [C, C] per image
  double* partials;                  // [k, tiles * tiles]
  const double *beta, *alpha_parts;  // [k, P], [k, alpha_tiles]
  int64_t alpha_tiles, P;
  double divisor;
  acc_t* loss;             // [k]
  unsigned* counters;      // k, at 0 (grid_ticket_counters)
  BatchTotal<acc_t> total;
};

// gram_tail_kernel, then in each image's last tile block to finish affinity_means_kernel's
// image_mean for it: the same bits as those two launches, in one; and where m.total.total is
// given, in the chunk's last image to finish, the batch's total. grid (tiles * tiles, k).
template <typename acc_t>
__global__ void gram_tail_means_kernel(const acc_t* __restrict__ g_ss, acc_t* __restrict__ kept, int64_t Cs,
                                       int64_t Ct, int64_t C, TailMeans<acc_t> m) {
  __shared__ acc_t mirror[kGramTile][kGramTile + 1];
  __shared__ double scratch[kThreads];
  __shared__ bool last;
  const int64_t b = blockIdx.y;
  const acc_t* sd = m.grams + b * (Cs + C) * C;
  double* partials = m.partials + b * gridDim.x;
  const double sum = gram_tile_sum(g_ss + b * Cs * Cs, sd, sd + Cs * C, kept + b * Cs * Ct, Cs, Ct, C, mirror, scratch);
  if (threadIdx.x == 0) partials[blockIdx.x] = sum;
  if (!last_to_arrive(m.counters + b, gridDim.x, &last)) return;
  image_mean(partials, gridDim.x, m.beta + b * m.P, m.alpha_parts + b * m.alpha_tiles, m.alpha_tiles, m.P, m.divisor,
             m.loss + b, scratch);
  const BatchTotal<acc_t>& t = m.total;
  if (t.total == nullptr || !last_to_arrive(t.images_done, gridDim.y, &last)) return;
  double total = 0;
  for (int64_t i = threadIdx.x; i < t.batch; i += kThreads) total += static_cast<double>(t.means[i]);
  total = block_sum(total, scratch);
  if (threadIdx.x == 0) *t.total = static_cast<acc_t>(total * t.scale);
}

}  // namespace affinity_cuda
}  // namespace idd_ops
