// The slot-map cosine's backward on CUDA (cosine_slots_backward.cuh): a factor pass over each
// image's pixels, then the rows kernel, for _pixel_centroid_cosine_slots_backward
// (pixel_centroid_cosine_slots_cuda.cu) and IFVD's loss backward (ifvd_maps_cuda.cu). The class
// of a pixel is one int16 load of the map _label_slots built (no resize, no 64-bit division per
// pixel); the class sums are cosine_class_sums.cuh's, in a fixed order.
#include <ATen/OpMathType.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/cosine.h"
#include "../common/cuda_next.h"
#include "centroid_norms.cuh"
#include "cosine_class_sums.cuh"
#include "cosine_slots_backward.cuh"
#include "cosine_slots_forward.cuh"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

using cosine_sums::ClassSums;
using cosine_sums::kThreadSums;

// Pixels per thread whose loads the backward's rows kernel issues together.
constexpr int kRowsAhead = 4;

// Block (s, b) takes segment s of image b's pixels (`segment` pixels, a multiple of blockDim.x;
// images grid-strided): per pixel a = g * alpha, bf = g * beta_f (0 where ignored), and the
// segment's class sums of g * beta_c into bc_part[b, s, :] (ClassSums: `warps` as there; the
// rows kernel adds the segments in order). Segments give the pass blocks enough to fill a GPU
// where one block per image (8 at B=8) would walk the image alone. `grad_at(e)`: pixel e's g
// (LoadedGrad for the op's gradient map; IFVD's loss forms it from its maps, IfvdGrad).
template <typename acc_t, typename Grad>
__device__ __forceinline__ void cosine_slots_factors(const Grad& grad_at, const acc_t* __restrict__ cos,
                                                     const acc_t* __restrict__ fnorm, const acc_t* __restrict__ cnorm,
                                                     const int16_t* __restrict__ slots, int64_t B, int64_t HW,
                                                     int64_t segment, int K, acc_t eps, int warps,
                                                     acc_t* __restrict__ a, acc_t* __restrict__ bf,
                                                     acc_t* __restrict__ bc_part) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_bytes);
  const int64_t segments = gridDim.x, s = blockIdx.x, begin = s * segment;
  const int64_t end = begin + segment < HW ? begin + segment : HW;
  for (int64_t b = blockIdx.y; b < B; b += gridDim.y) {
    acc_t* part = bc_part + (b * segments + s) * K;
    ClassSums<acc_t> sums(smem, warps, part, 1, K);
    // every lane runs the same number of steps (ClassSums::add needs whole warps)
    for (int64_t base = begin; base < end; base += blockDim.x) {
      const int64_t p = base + threadIdx.x, e = b * HW + p;
      const int k = p < end ? slot_class(slots + b * HW, p, K) : -1;
      acc_t vc = 0;
      if (k >= 0) {
        const CosineGrad<acc_t> cg = clamped_cosine_grad(cos[e], fnorm[e], cnorm[b * K + k], eps);
        const acc_t g = grad_at(e);
        a[e] = g * cg.alpha, bf[e] = g * cg.beta_f;
        vc = g * cg.beta_c;
      } else if (p < end) {
        a[e] = 0, bf[e] = 0;
      }
      sums.add(k, vc);
    }
    __syncthreads();
    sums.finish(smem);
    if (warps != 0)
      for (int k = threadIdx.x; k < K; k += blockDim.x) part[k] = sums.total(smem, k);
    __syncthreads();  // the next image zeroes the shared sums
  }
}

template <typename acc_t>
struct LoadedGrad {
  const acc_t* grad;
  __device__ acc_t operator()(int64_t e) const { return grad[e]; }
};

// IFVD's loss gradient at pixel e, norm * (cos_s - cos_t) * g (norm = 2 * the loss's factor,
// g its gradient): mse_loss_backward's order of operations (the same bits as the composite's map).
template <typename acc_t>
struct IfvdGrad {
  const acc_t *cos_s, *cos_t;
  acc_t norm, g;
  __device__ acc_t operator()(int64_t e) const { return norm * (cos_s[e] - cos_t[e]) * g; }
};

template <typename acc_t>
__global__ void cosine_slots_factors_kernel(const acc_t* __restrict__ grad, const acc_t* __restrict__ cos,
                                            const acc_t* __restrict__ fnorm, const acc_t* __restrict__ cnorm,
                                            const int16_t* __restrict__ slots, int64_t B, int64_t HW, int64_t segment,
                                            int K, acc_t eps, int warps, acc_t* __restrict__ a,
                                            acc_t* __restrict__ bf, acc_t* __restrict__ bc_part) {
  cosine_slots_factors(LoadedGrad<acc_t>{grad}, cos, fnorm, cnorm, slots, B, HW, segment, K, eps, warps, a, bf,
                       bc_part);
}

// The next set's (cuda_next.h) factor pass of IFVD's loss: its gradient map formed per pixel from
// the two maps and the loss's gradient (grad, 0-dim), where a launch of its own wrote it.
template <typename acc_t>
__global__ void ifvd_loss_factors_kernel(const acc_t* __restrict__ grad, acc_t norm, const acc_t* __restrict__ cos,
                                         const acc_t* __restrict__ cos_t, const acc_t* __restrict__ fnorm,
                                         const acc_t* __restrict__ cnorm, const int16_t* __restrict__ slots, int64_t B,
                                         int64_t HW, int64_t segment, int K, acc_t eps, int warps,
                                         acc_t* __restrict__ a, acc_t* __restrict__ bf, acc_t* __restrict__ bc_part) {
  cosine_slots_factors(IfvdGrad<acc_t>{cos, cos_t, norm, *grad}, cos, fnorm, cnorm, slots, B, HW, segment, K, eps,
                       warps, a, bf, bc_part);
}

// ROWS (image, channel) rows of one image a block, rows row0 .. row0 + ROWS - 1: writes those
// rows of grad_feats and each row's channel gradient for every class centroid, from the class
// sums of a * x (ClassSums: `warps` as there, each row's sums `region` words after the last's;
// with no shared sums, the one warp adds into grad_c itself) and the factor pass's per-segment
// sums. With `counts` (own centroids: op schema in idd_ops.cpp) the rows' gradient waits for the
// centroid gradients: the first walk only sums, the second (the rows again, from L2: 32 KiB a row
// at the Cityscapes shape) writes each pixel with its share grad_c[k] / n_k added (share_t, a
// row's K shares side by side), which saves IFVD a class-sum backward pass over the whole
// gradient and the sum of two gradients after it. The pixels read their class's centroid value
// and share from K neighbouring words (channel-major tables), not from K rows C values apart.
// A row's adds are those of a one-row block (each thread its pixels in order, then a warp per
// class), so ROWS changes no bit; what it saves is L2 traffic: a pixel's slot, a and bf serve
// ROWS rows, where each row read them again (28 bytes a pixel and row from L2 at ROWS = 1 with
// counts, 20 at 2).
template <typename scalar_t, int ROWS>
__device__ __forceinline__ void cosine_rows(const scalar_t* __restrict__ f,
                                            const at::opmath_type<scalar_t>* __restrict__ cent_t,
                                            const at::opmath_type<scalar_t>* __restrict__ a,
                                            const at::opmath_type<scalar_t>* __restrict__ bf,
                                            const at::opmath_type<scalar_t>* __restrict__ bc_part, int64_t segments,
                                            const int16_t* __restrict__ slots, const int64_t* __restrict__ counts,
                                            int64_t C, int64_t HW, int K, int warps, int64_t region, int64_t row0,
                                            scalar_t* __restrict__ grad_f, at::opmath_type<scalar_t>* grad_c,
                                            at::opmath_type<scalar_t>* __restrict__ share_t) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_bytes);
  const int64_t b = row0 / C, c = row0 % C;
  ClassSums<acc_t> sums[ROWS];
  const scalar_t* x[ROWS];
  scalar_t* out[ROWS];
  const acc_t* cb[ROWS];  // row r's class k value: cb[r][k] (channel-major table)
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    sums[r].start(smem + r * region, warps, grad_c + b * K * C + c + r, C, K);
    x[r] = f + (row0 + r) * HW;
    out[r] = grad_f + (row0 + r) * HW;
    cb[r] = cent_t + (row0 + r) * K;
  }
  const acc_t* ab = a + b * HW;
  const acc_t* bb = bf + b * HW;
  const int16_t* sb = slots + b * HW;
  // kRowsAhead pixels per thread loaded before any is added (in the order of one pixel a step,
  // so the sums keep their bits): one 4-byte load of the row per memory round trip was too few
  // bytes in flight.
  for (int64_t base = 0; base < HW; base += kRowsAhead * static_cast<int64_t>(blockDim.x)) {
    int k[kRowsAhead];
    acc_t xv[ROWS][kRowsAhead], av[kRowsAhead];
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {
      const int64_t p = base + u * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      k[u] = p < HW ? sb[p] : -1;  // checked below: a check here would wait for the load
#pragma unroll
      for (int r = 0; r < ROWS; ++r) xv[r][u] = p < HW ? static_cast<acc_t>(x[r][p]) : acc_t(0);
      av[u] = p < HW ? ab[p] : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {
      const int64_t p = base + u * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      const int kc = checked_slot(k[u], K);
      // ROWS > 1: one load of bf for the block's rows (one row loads it where it uses it)
      const acc_t bv = ROWS > 1 && counts == nullptr && p < HW && kc >= 0 ? bb[p] : acc_t(0);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        // an ignored pixel's gradient is 0, not 0 * x, so that a NaN there stays out (METHOD.md 2)
        if (counts == nullptr && p < HW)
          out[r][p] =
              static_cast<scalar_t>(kc >= 0 ? av[u] * cb[r][kc] + (ROWS > 1 ? bv : bb[p]) * xv[r][u] : acc_t(0));
        sums[r].add(kc, av[u] * xv[r][u]);  // every lane, every step (ClassSums::add needs whole warps)
      }
    }
  }
  __syncthreads();
#pragma unroll
  for (int r = 0; r < ROWS; ++r) sums[r].finish(smem + r * region);
  const acc_t* part = bc_part + b * segments * K;
  acc_t* gcb[ROWS];    // row r's class k gradient: gcb[r][k * C]
  acc_t* share[ROWS];  // row r's shares, channel-major
#pragma unroll
  for (int r = 0; r < ROWS; ++r) {
    gcb[r] = grad_c + b * K * C + c + r;
    share[r] = counts != nullptr ? share_t + (row0 + r) * K : nullptr;
  }
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    acc_t bc = 0;  // the factor pass's segments, in order: the same bits on every run
    for (int64_t s = 0; s < segments; ++s) bc += part[s * K + k];
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
      const acc_t g = sums[r].total(smem + r * region, k) + bc * cb[r][k];
      gcb[r][k * C] = g;
      if (share[r] != nullptr) share[r][k] = g / static_cast<acc_t>(counts[b * K + k] > 1 ? counts[b * K + k] : 1);
    }
  }
  if (share[0] == nullptr) return;
  __syncthreads();  // the block's writes of `share` above are visible to all its threads after it
  for (int64_t base = threadIdx.x; base < HW; base += kRowsAhead * static_cast<int64_t>(blockDim.x)) {
    acc_t g[ROWS][kRowsAhead];
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {  // every load of the steps, then every store
      const int64_t p = base + u * static_cast<int64_t>(blockDim.x);
      const int k = p < HW ? sb[p] : -1;  // checked by the first walk
      const int kk = k >= 0 ? k : 0;
      // ROWS > 1: one load of bf and of a for the block's rows (one row loads them where it uses them)
      const acc_t bv1 = ROWS > 1 && p < HW ? bb[p] : acc_t(0), av1 = ROWS > 1 && k >= 0 ? ab[p] : acc_t(0);
#pragma unroll
      for (int r = 0; r < ROWS; ++r) {
        const acc_t xv = p < HW ? static_cast<acc_t>(x[r][p]) : acc_t(0);
        const acc_t bv = ROWS > 1 ? bv1 : p < HW ? bb[p] : acc_t(0);
        // as above for ignored pixels
        g[r][u] = k >= 0 ? bv * xv + ((ROWS > 1 ? av1 : ab[p]) * cb[r][kk] + share[r][kk]) : acc_t(0);
      }
    }
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {
      const int64_t p = base + u * static_cast<int64_t>(blockDim.x);
#pragma unroll
      for (int r = 0; r < ROWS; ++r)
        if (p < HW) out[r][p] = static_cast<scalar_t>(g[r][u]);
    }
  }
}

// One row a block (row_blocks): every K and C.
template <typename scalar_t>
__global__ void cosine_slots_backward_rows_kernel(const scalar_t* __restrict__ f,
                                                  const at::opmath_type<scalar_t>* __restrict__ cent_t,
                                                  const at::opmath_type<scalar_t>* __restrict__ a,
                                                  const at::opmath_type<scalar_t>* __restrict__ bf,
                                                  const at::opmath_type<scalar_t>* __restrict__ bc_part,
                                                  int64_t segments, const int16_t* __restrict__ slots,
                                                  const int64_t* __restrict__ counts, int64_t C, int64_t HW, int K,
                                                  int warps, scalar_t* __restrict__ grad_f,
                                                  at::opmath_type<scalar_t>* grad_c,
                                                  at::opmath_type<scalar_t>* __restrict__ share_t) {
  cosine_rows<scalar_t, 1>(f, cent_t, a, bf, bc_part, segments, slots, counts, C, HW, K, warps, 0, blockIdx.x,
                           grad_f, grad_c, share_t);
}

// The next set's (cuda_next.h): two rows of an image a block (row_pairs: per-thread sums,
// C even), rows 2 * blockIdx.x and the next.
template <typename scalar_t>
__global__ void cosine_slots_backward_row_pairs_kernel(
    const scalar_t* __restrict__ f, const at::opmath_type<scalar_t>* __restrict__ cent_t,
    const at::opmath_type<scalar_t>* __restrict__ a, const at::opmath_type<scalar_t>* __restrict__ bf,
    const at::opmath_type<scalar_t>* __restrict__ bc_part, int64_t segments, const int16_t* __restrict__ slots,
    const int64_t* __restrict__ counts, int64_t C, int64_t HW, int K, int64_t region,
    scalar_t* __restrict__ grad_f, at::opmath_type<scalar_t>* grad_c, at::opmath_type<scalar_t>* __restrict__ share_t) {
  cosine_rows<scalar_t, 2>(f, cent_t, a, bf, bc_part, segments, slots, counts, C, HW, K, kThreadSums, region,
                           2 * static_cast<int64_t>(blockIdx.x), grad_f, grad_c, share_t);
}

// How a slot backward block keeps its class sums (ClassSums), within the default 48 KiB of
// shared memory (no opt-in needed): per thread (kThreads threads) where K sums each and K totals
// fit (K up to 47 in float32, 23 in float64); else per warp, as many warps (up to kThreads / 32)
// as have K sums each; else 0, one warp adding into global memory.
struct SumLayout {
  int warps;  // ClassSums' argument
  unsigned threads;
  size_t shared;
};

// Segments of an image's pixels for the slots backward's factor pass: at least kMinSteps block
// steps each, and few enough that each rows block's fixed-order adding of the segments' class
// sums (K * segments loads, after its own pass over HW pixels) stays a small share of it. One
// where the sums go straight to global memory (warps == 0: K past 48 KiB of sums).
int64_t factor_segments(int64_t HW, int64_t K, int warps, unsigned threads) {
  constexpr int64_t kMinSteps = 4, kMaxLoads = 1024, kMaxSegments = 64;
  if (warps == 0) return 1;
  const int64_t by_pixels = HW / (kMinSteps * static_cast<int64_t>(threads));
  const int64_t by_loads = kMaxLoads / std::max<int64_t>(K, 1);
  return std::max<int64_t>(1, std::min({by_pixels, by_loads, kMaxSegments}));
}

// Whether the backward's rows go two a block (the next set's, cuda_next.h): where a row's sums
// are per thread (K up to 23 in float32, 11 in float64) and two rows' fit the default 48 KiB,
// and C is even (a block's two rows are one image's).
bool row_pairs(int64_t C, int warps, size_t shared) {
  return cuda_next_enabled(NextGroup::cosine_backward) && warps == kThreadSums && C % 2 == 0 && 2 * shared <= 48 * 1024;
}

SumLayout class_sum_layout(int64_t K, size_t bytes) {
  constexpr int64_t kBudget = 48 * 1024;
  K = std::max<int64_t>(K, 1);
  if ((K * kThreads + K) * static_cast<int64_t>(bytes) <= kBudget)
    return {kThreadSums, static_cast<unsigned>(kThreads), static_cast<size_t>((K * kThreads + K) * bytes)};
  const int warps = static_cast<int>(std::min<int64_t>(kThreads / 32, kBudget / (K * static_cast<int64_t>(bytes))));
  return {warps, static_cast<unsigned>(32 * std::max(warps, 1)), static_cast<size_t>(warps * K * bytes)};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cosine_slots_backward_cuda(const at::Tensor& grad_in, const at::Tensor& feats_in,
                                                              const CentroidTable& table, const at::Tensor& slots_in,
                                                              const at::Tensor& cos_in, const at::Tensor& fnorm_in,
                                                              double eps, const std::optional<at::Tensor>& counts_in,
                                                              const IfvdLossGrad* ifvd) {
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const int64_t K = table.norms.size(1);
  // the rows kernel writes every centroid gradient (ClassSums zeroes what it adds into)
  const CosineBackwardTensors t = cosine_backward_maps(grad_in, feats_in, K, cos_in, fnorm_in, /*zero_grad_c=*/false);
  const at::Tensor &feats = t.feats, &grad = t.grad, &cosv = t.cos, &fnorm = t.fnorm;
  const at::Tensor &grad_f = t.grad_f, &grad_c = t.grad_c, slots = slots_in.contiguous();
  const at::Tensor counts = counts_in ? counts_in->contiguous() : at::Tensor();
  const int64_t B = feats.size(0), C = feats.size(1), HW = feats.size(2) * feats.size(3);
  if (feats.numel() == 0) return {grad_f, grad_c.zero_()};  // no pixels: no gradient
  const at::TensorOptions acc = grad_c.options();
  at::Tensor a = at::empty({B, HW}, acc), bf = at::empty_like(a);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor &cent_t = table.channel_major, &cnorm = table.norms;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_slots_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const auto [warps, threads, shared] = class_sum_layout(K, sizeof(acc_t));
    const int64_t segments = factor_segments(HW, K, warps, threads);
    const int64_t segment = (HW + segments - 1) / segments;
    const int64_t step = threads, whole = (segment + step - 1) / step * step;  // whole block steps
    // the factor pass writes every segment's class sums (and zeroes those it adds into in global memory)
    at::Tensor bc_part = at::empty({B, segments, K}, acc);
    const dim3 grid(static_cast<unsigned>(segments), static_cast<unsigned>(std::min(B, kMaxGridYZ)));
    if (ifvd == nullptr) {
      cosine_slots_factors_kernel<acc_t><<<grid, threads, shared, stream>>>(
          grad.const_data_ptr<acc_t>(), cosv.const_data_ptr<acc_t>(), fnorm.const_data_ptr<acc_t>(),
          cnorm.const_data_ptr<acc_t>(), slots.const_data_ptr<int16_t>(), B, HW, whole, static_cast<int>(K),
          static_cast<acc_t>(eps), warps, a.data_ptr<acc_t>(), bf.data_ptr<acc_t>(), bc_part.data_ptr<acc_t>());
    } else {
      const at::Tensor cos_t = ifvd->cos_teacher.contiguous();
      ifvd_loss_factors_kernel<acc_t><<<grid, threads, shared, stream>>>(
          grad.const_data_ptr<acc_t>(), static_cast<acc_t>(ifvd->norm), cosv.const_data_ptr<acc_t>(),
          cos_t.const_data_ptr<acc_t>(), fnorm.const_data_ptr<acc_t>(), cnorm.const_data_ptr<acc_t>(),
          slots.const_data_ptr<int16_t>(), B, HW, whole, static_cast<int>(K), static_cast<acc_t>(eps), warps,
          a.data_ptr<acc_t>(), bf.data_ptr<acc_t>(), bc_part.data_ptr<acc_t>());
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    // with counts: each row's shares grad_c / n, channel-major like cent_t, for the second walk
    at::Tensor share_t = counts.defined() ? at::empty({B, C, K}, acc) : at::Tensor();
    const int64_t* counts_ptr = counts.defined() ? counts.const_data_ptr<int64_t>() : nullptr;
    acc_t* share_ptr = share_t.defined() ? share_t.data_ptr<acc_t>() : nullptr;
    if (row_pairs(C, warps, shared)) {
      // a row's sums and totals, K * threads + K words: shared / sizeof(acc_t) (class_sum_layout)
      cosine_slots_backward_row_pairs_kernel<scalar_t><<<row_blocks(B, C) / 2, threads, 2 * shared, stream>>>(
          feats.const_data_ptr<scalar_t>(), cent_t.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
          bf.const_data_ptr<acc_t>(), bc_part.const_data_ptr<acc_t>(), segments, slots.const_data_ptr<int16_t>(),
          counts_ptr, C, HW, static_cast<int>(K), static_cast<int64_t>(shared / sizeof(acc_t)),
          grad_f.data_ptr<scalar_t>(), grad_c.data_ptr<acc_t>(), share_ptr);
    } else {
      cosine_slots_backward_rows_kernel<scalar_t><<<row_blocks(B, C), threads, shared, stream>>>(
          feats.const_data_ptr<scalar_t>(), cent_t.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
          bf.const_data_ptr<acc_t>(), bc_part.const_data_ptr<acc_t>(), segments, slots.const_data_ptr<int16_t>(),
          counts_ptr, C, HW, static_cast<int>(K), warps, grad_f.data_ptr<scalar_t>(), grad_c.data_ptr<acc_t>(),
          share_ptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_f, grad_c};
}

}  // namespace idd_ops
