// Per-pixel cosine similarity to the pixel's class centroid (the IFVD map) with the pixel
// classes read from a class-slot map (_pixel_centroid_cosine_slots and its backward) on CUDA.
// Ignored pixels (slot -1) score 1 and carry no gradient.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"
#include "../common/cosine.h"
#include "centroid_norms.cuh"
#include "cosine_slots_backward.cuh"
#include "cosine_slots_forward.cuh"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

// The class of a pixel is one int16 load of the map _label_slots built (no resize, no 64-bit
// division per pixel). The backward's class sums are added in a fixed order, with no atomics, so
// they are the same bits on every run (ClassSums): where K sums per thread fit in shared memory,
// each thread adds its pixels into its own sums and a warp per class adds the block's threads in
// order; otherwise each warp adds its lanes into warp-private sums (one butterfly per class
// present among its lanes, so a fragmented label map costs a loop over its classes) and the block
// adds its warps' sums in warp order.

// Adds v of the lanes whose class is k into this warp's own sum of class k, sums[k * stride],
// for each class k >= 0 among the lanes: one butterfly per class, lane 0 writes (the sums belong
// to this warp alone). Warp-uniform loop: every lane of the warp must call it.
template <typename acc_t>
__device__ __forceinline__ void warp_add_to_class(acc_t* sums, int64_t stride, int k, acc_t v) {
  unsigned pending = __ballot_sync(0xffffffffu, k >= 0);
  while (pending) {
    const int kk = __shfl_sync(0xffffffffu, k, __ffs(pending) - 1);
    pending &= ~__ballot_sync(0xffffffffu, k == kk);
    const acc_t s = warp_sum(k == kk ? v : acc_t(0));
    if ((threadIdx.x & 31) == 0) sums[kk * stride] += s;
  }
}

// Where a block keeps its class sums (the host picks by K, class_sum_layout below):
//  warps == kThreadSums: per thread, thread t's class k at smem[k * blockDim.x + t] (a warp's
//    lanes hit 32 consecutive words), then finish() puts the class totals at smem[K * blockDim.x + k];
//  warps > 0: per warp, warp w's class k at smem[k * warps + w];
//  warps == 0 (K sums pass the default 48 KiB): the block is one warp that adds straight into
//    `global` (its class k at global[k * global_stride]).
// Constructing it zeroes the sums and waits for the block (__syncthreads): every thread must
// construct it, call add() at every step, and call finish() after a __syncthreads that follows
// the adds.
constexpr int kThreadSums = -1;

template <typename acc_t>
struct ClassSums {
  acc_t* sums;  // this thread's (or warp's) class 0
  int64_t stride;
  int warps, K;

  __device__ ClassSums(acc_t* smem, int warps_, acc_t* global, int64_t global_stride, int K_) : warps(warps_), K(K_) {
    const bool per_thread = warps == kThreadSums;
    sums = per_thread ? smem + threadIdx.x : warps > 0 ? smem + threadIdx.x / 32 : global;
    stride = per_thread ? blockDim.x : warps > 0 ? warps : global_stride;
    acc_t* all = warps != 0 ? smem : global;
    const int64_t n = static_cast<int64_t>(K) * (per_thread ? blockDim.x : warps > 0 ? warps : 1);
    for (int64_t i = threadIdx.x; i < n; i += blockDim.x) all[warps != 0 ? i : i * global_stride] = 0;
    __syncthreads();
  }

  __device__ void add(int k, acc_t v) {
    if (warps != kThreadSums) {
      warp_add_to_class(sums, stride, k, v);
    } else if (k >= 0) {
      sums[k * stride] += v;
    }
  }

  // Per thread: a warp per class adds the class's blockDim.x sums (each lane its share in thread
  // order, then a butterfly), into smem[K * blockDim.x + k]; ends with a __syncthreads.
  __device__ void finish(acc_t* smem) const {
    if (warps != kThreadSums) return;
    const int lane = threadIdx.x % 32, n = blockDim.x;
    for (int k = threadIdx.x / 32; k < K; k += n / 32) {
      acc_t v = 0;
      for (int t = lane; t < n; t += 32) v += smem[k * n + t];
      v = warp_sum(v);
      if (lane == 0) smem[K * n + k] = v;
    }
    __syncthreads();
  }

  // The block's sum of class k, in a fixed order; call after finish().
  __device__ acc_t total(const acc_t* smem, int k) const {
    if (warps == kThreadSums) return smem[static_cast<int64_t>(K) * blockDim.x + k];
    if (warps == 0) return sums[k * stride];
    acc_t t = 0;
    for (int w = 0; w < warps; ++w) t += smem[k * warps + w];
    return t;
  }
};

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

// One block per (image, channel) row: writes that row of grad_feats and the channel's gradient
// for every class centroid, from the class sums of a * x (ClassSums: `warps` as there; with no
// shared sums, the one warp adds into grad_c itself) and the factor pass's per-segment sums.
// With `counts` (own centroids: op schema in idd_ops.cpp) the row's gradient waits for the
// centroid gradients: the first walk only sums, the second (the row again, from L2: 32 KiB at
// the Cityscapes shape) writes each pixel with its share grad_c[k] / n_k added (share_t, the
// row's K shares side by side), which saves IFVD a class-sum backward pass over the whole
// gradient and the sum of two gradients after it. The pixels read their class's centroid value
// and share from K neighbouring words (channel-major tables), not from K rows C values apart.
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
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  acc_t* smem = reinterpret_cast<acc_t*>(smem_bytes);
  const int64_t row = blockIdx.x, b = row / C, c = row % C;
  ClassSums<acc_t> sums(smem, warps, grad_c + b * K * C + c, C, K);
  const scalar_t* x = f + row * HW;
  scalar_t* out = grad_f + row * HW;
  const acc_t* ab = a + b * HW;
  const acc_t* bb = bf + b * HW;
  const acc_t* cb = cent_t + row * K;  // class k's value of channel c: cb[k] (channel-major table)
  const int16_t* sb = slots + b * HW;
  // kRowsAhead pixels per thread loaded before any is added (in the order of one pixel a step,
  // so the sums keep their bits): one 4-byte load of the row per memory round trip was too few
  // bytes in flight.
  for (int64_t base = 0; base < HW; base += kRowsAhead * static_cast<int64_t>(blockDim.x)) {
    int k[kRowsAhead];
    acc_t xv[kRowsAhead], av[kRowsAhead];
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {
      const int64_t p = base + u * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      k[u] = p < HW ? sb[p] : -1;  // checked below: a check here would wait for the load
      xv[u] = p < HW ? static_cast<acc_t>(x[p]) : acc_t(0);
      av[u] = p < HW ? ab[p] : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {
      const int64_t p = base + u * static_cast<int64_t>(blockDim.x) + threadIdx.x;
      const int kc = checked_slot(k[u], K);
      // an ignored pixel's gradient is 0, not 0 * x, so that a NaN there stays out (METHOD.md 2)
      if (counts == nullptr && p < HW)
        out[p] = static_cast<scalar_t>(kc >= 0 ? av[u] * cb[kc] + bb[p] * xv[u] : acc_t(0));
      sums.add(kc, av[u] * xv[u]);  // every lane, every step (ClassSums::add needs whole warps)
    }
  }
  __syncthreads();
  sums.finish(smem);
  const acc_t* part = bc_part + b * segments * K;
  acc_t* gcb = grad_c + b * K * C + c;  // class k's gradient of channel c: gcb[k * C]
  acc_t* share = counts != nullptr ? share_t + row * K : nullptr;  // the row's shares, channel-major
  for (int k = threadIdx.x; k < K; k += blockDim.x) {
    acc_t bc = 0;  // the factor pass's segments, in order: the same bits on every run
    for (int64_t s = 0; s < segments; ++s) bc += part[s * K + k];
    const acc_t g = sums.total(smem, k) + bc * cb[k];
    gcb[k * C] = g;
    if (share != nullptr) share[k] = g / static_cast<acc_t>(counts[b * K + k] > 1 ? counts[b * K + k] : 1);
  }
  if (share == nullptr) return;
  __syncthreads();  // the block's writes of `share` above are visible to all its threads after it
  for (int64_t base = threadIdx.x; base < HW; base += kRowsAhead * static_cast<int64_t>(blockDim.x)) {
    acc_t g[kRowsAhead];
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {  // every load of the steps, then every store
      const int64_t p = base + u * static_cast<int64_t>(blockDim.x);
      const int k = p < HW ? sb[p] : -1;  // checked by the first walk
      const int kk = k >= 0 ? k : 0;
      const acc_t xv = p < HW ? static_cast<acc_t>(x[p]) : acc_t(0), bv = p < HW ? bb[p] : acc_t(0);
      g[u] = k >= 0 ? bv * xv + (ab[p] * cb[kk] + share[kk]) : acc_t(0);  // as above for ignored pixels
    }
#pragma unroll
    for (int u = 0; u < kRowsAhead; ++u) {
      const int64_t p = base + u * static_cast<int64_t>(blockDim.x);
      if (p < HW) out[p] = static_cast<scalar_t>(g[u]);
    }
  }
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

SumLayout class_sum_layout(int64_t K, size_t bytes) {
  constexpr int64_t kBudget = 48 * 1024;
  K = std::max<int64_t>(K, 1);
  if ((K * kThreads + K) * static_cast<int64_t>(bytes) <= kBudget)
    return {kThreadSums, static_cast<unsigned>(kThreads), static_cast<size_t>((K * kThreads + K) * bytes)};
  const int warps = static_cast<int>(std::min<int64_t>(kThreads / 32, kBudget / (K * static_cast<int64_t>(bytes))));
  return {warps, static_cast<unsigned>(32 * std::max(warps, 1)), static_cast<size_t>(warps * K * bytes)};
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_kernel(const at::Tensor& feats_in,
                                                                      const at::Tensor& centroids_in,
                                                                      const at::Tensor& slots_in, double eps,
                                                                      const std::optional<at::Tensor>& counts) {
  check_pixel_centroid_cosine_slots_inputs(feats_in, centroids_in, slots_in, eps, counts);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  const at::Tensor feats = feats_in.contiguous(), slots = slots_in.contiguous();
  const int64_t B = feats.size(0), C = feats.size(1), HW = feats.size(2) * feats.size(3), K = centroids_in.size(1);
  const auto acc = acc_dtype(feats.scalar_type());
  const at::Tensor cent = centroids_in.to(acc).contiguous();
  // the kernel writes every pixel of both maps: no fill launches
  at::Tensor cos = at::empty({B, feats.size(2), feats.size(3)}, feats.options().dtype(acc)), fnorm = at::empty_like(cos);
  if (cos.numel() == 0) return {cos, fnorm};
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const CentroidTable table = centroid_table(cent, stream);
  const at::Tensor &cent_t = table.channel_major, &cnorm = table.norms;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, feats.scalar_type(), "pixel_centroid_cosine_slots_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const dim3 grid(static_cast<unsigned>((HW + kCosinePixels - 1) / kCosinePixels),
                    static_cast<unsigned>(std::min(B, kMaxGridYZ)));
    cosine_slots_forward_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        feats.const_data_ptr<scalar_t>(), cent_t.const_data_ptr<acc_t>(), cnorm.const_data_ptr<acc_t>(),
        slots.const_data_ptr<int16_t>(), B, C, HW, static_cast<int>(K), static_cast<acc_t>(eps), cos.data_ptr<acc_t>(),
        fnorm.data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {cos, fnorm};
}

std::tuple<at::Tensor, at::Tensor> pixel_centroid_cosine_slots_backward_kernel(
    const at::Tensor& grad_in, const at::Tensor& feats_in, const at::Tensor& centroids_in, const at::Tensor& slots_in,
    const at::Tensor& cos_in, const at::Tensor& fnorm_in, double eps, const std::optional<at::Tensor>& counts_in) {
  check_pixel_centroid_cosine_slots_backward_inputs(grad_in, feats_in, centroids_in, slots_in, cos_in, fnorm_in, eps,
                                                    counts_in);
  const c10::cuda::CUDAGuard guard(feats_in.device());
  if (feats_in.numel() == 0)  // no pixels: no gradient, and no table to build
    return {at::empty_like(feats_in, at::MemoryFormat::Contiguous),
            at::zeros_like(centroids_in, at::MemoryFormat::Contiguous)};
  const at::Tensor cent = centroids_in.to(acc_dtype(feats_in.scalar_type())).contiguous();
  const CentroidTable table = centroid_table(cent, c10::cuda::getCurrentCUDAStream());
  auto [grad_f, grad_c] =
      cosine_slots_backward_cuda(grad_in, feats_in, table, slots_in, cos_in, fnorm_in, eps, counts_in, nullptr);
  return {grad_f, grad_c.to(centroids_in.scalar_type())};
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
    cosine_slots_backward_rows_kernel<scalar_t><<<row_blocks(B, C), threads, shared, stream>>>(
        feats.const_data_ptr<scalar_t>(), cent_t.const_data_ptr<acc_t>(), a.const_data_ptr<acc_t>(),
        bf.const_data_ptr<acc_t>(), bc_part.const_data_ptr<acc_t>(), segments, slots.const_data_ptr<int16_t>(),
        counts.defined() ? counts.const_data_ptr<int64_t>() : nullptr, C, HW, static_cast<int>(K), warps,
        grad_f.data_ptr<scalar_t>(), grad_c.data_ptr<acc_t>(),
        share_t.defined() ? share_t.data_ptr<acc_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {grad_f, grad_c};
}

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("_pixel_centroid_cosine_slots", &pixel_centroid_cosine_slots_kernel);
  m.impl("_pixel_centroid_cosine_slots_backward", &pixel_centroid_cosine_slots_backward_kernel);
}

}  // namespace idd_ops
