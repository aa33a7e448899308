#pragma once
// Pixel KD's per-pixel walks on CUDA, shared by softmax_kl's kernels (softmax_kl_cuda.cu) and
// _pixel_kd_sum's (pixel_kd_sum_cuda.cu): one pixel's vector through the online softmax in the
// forward, the backward's walk in memory order, and the grid and pack choices of their launches.
#include <ATen/OpMathType.h>

#include <algorithm>
#include <initializer_list>
#include <limits>

#include "../common/softmax_kl_online.h"
#include "cuda_utils.cuh"
#include "vectorized.cuh"

namespace idd_ops {

template <typename T>
__device__ __forceinline__ T neg_inf() {
  return -std::numeric_limits<T>::infinity();
}

// ---- vectors along a strided dim (inner > 1): pixel KD -----------------------------------

// A thread per pixel (grid x: pixel tiles, y: images), walking the classes in chunks of CH held
// in registers: every load of a chunk is in flight at once, and a warp reads 128 contiguous
// bytes of a class row (float). A first version gave each thread a 16-byte pack of 4
// pixels: ptxas needed 121-126 registers for it, 2 blocks of 256 per SM, and the H200 measured
// 0.5 ms at B=8 (1.4 TB/s, no faster than the two-pass kernel): its 16 warps per SM all
// loaded, then all computed (18 exps per pixel and chunk of 8 classes), and the memory idled
// while they did. A pixel per thread in 40 registers (ptxas, sm_90, float, no spills) runs 6
// blocks per SM: 48 warps with 96 KB in flight, so some compute while others wait. Double holds
// 4 classes per chunk in 79 registers (its exp needs more), 3 blocks per SM.
template <typename acc_t>
constexpr int pixel_forward_blocks_per_sm() {
  return sizeof(acc_t) == 8 ? 3 : 6;
}

// One pixel's vector, from its first class's element `base` on: the classes in chunks of CH.
template <typename scalar_t>
__device__ __forceinline__ SoftmaxKLVector<at::opmath_type<scalar_t>> pixel_vector(
    const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t base, int64_t length, int64_t inner,
    at::opmath_type<scalar_t> inv_T) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CH = sizeof(acc_t) == 8 ? 4 : 8;
  OnlineSoftmaxKL<acc_t> st;
  for (int64_t c0 = 0; c0 < length; c0 += CH) {
    acc_t u[CH], v[CH];
#pragma unroll
    for (int j = 0; j < CH; ++j) {
      if (c0 + j < length) {
        u[j] = static_cast<acc_t>(s[base + (c0 + j) * inner]) * inv_T;
        v[j] = static_cast<acc_t>(t[base + (c0 + j) * inner]) * inv_T;
      } else {  // past the last class: -inf adds nothing
        u[j] = v[j] = neg_inf<acc_t>();
      }
    }
    st.add(u, v);
  }
  return st.finish();
}

// d KL / d s = grad * (softmax(s / T) - softmax(t / T)) / T; 0 for a vector settled by the -inf
// rule, whose log-sum-exps are +inf (softmax_kl_vector).
template <typename acc_t>
__device__ __forceinline__ acc_t kl_grad(acc_t coef, acc_t u, acc_t v, SplitLse<acc_t> ls, SplitLse<acc_t> lt) {
  return coef * (probability(u, ls) - probability(v, lt));
}

// The backward needs no reduction, so it streams [outer, length, inner] in memory order: a
// thread per 16-byte pack of pixels and a few classes of one image (grid x: pixel tiles, y:
// images, z: class groups; no per-element index division). The per-pixel values (the gradient
// and both log-sum-exps) are read once per thread, as packs where aligned, and re-read from L2
// by each class group (an image's three [inner] rows stay there while its class rows stream
// past). A first version walked each pixel pack through all the classes, as the forward
// must, 2 MiB apart per class at 512x1024: 1.0 ms on an H200 at B=8 (1 TB/s), where the two-pass
// kernel took 0.7 ms.
constexpr int kClassesPerThread = 4;

// N values at p, p + stride, ...: one aligned pack where `packed` (stride 1, checked by the host).
template <int N, typename T>
__device__ __forceinline__ Pack<T, N> load_values(const T* p, int64_t stride, bool packed) {
  if (packed) return load_pack<N>(p);
  Pack<T, N> r;
#pragma unroll
  for (int j = 0; j < N; ++j) r.v[j] = p[j * stride];
  return r;
}

// Blocks per SM the backward asks registers for: 4 (64 registers) holds the float and double
// packs; half and bfloat16 packs of 8 pixels hold 8 split log-sum-exp pairs a side (32
// registers) and spill 64 bytes at 64, so 3 (ptxas, sm_90: 94 uncapped, 2 blocks; capped 80,
// with no spill for half and 8 bytes for bfloat16).
template <int VEC>
constexpr int pixel_backward_blocks_per_sm() {
  return VEC == 8 ? 3 : 4;
}

// The backward's walk; kSum: _pixel_kd_sum's, whose gradient is grad[0] * factor[0] at the pixels
// whose slot is >= 0 (every pixel without slots) and 0 at the others, rounded to the accumulation
// dtype once (as its composite's torch.where gives them), where softmax_kl's reads it per pixel.
// packed_pixels: whether that per-pixel input (softmax_kl's gradient, or the slots) is read in
// packs.
template <typename scalar_t, int VEC, bool kSum>
__device__ __forceinline__ void pixels_backward(const at::opmath_type<scalar_t>* __restrict__ grad, int64_t g_outer,
                                                int64_t g_inner, bool packed_pixels, const double* __restrict__ factor,
                                                const int16_t* __restrict__ slots, const scalar_t* __restrict__ s,
                                                const scalar_t* __restrict__ t, const double* __restrict__ lse_s,
                                                const double* __restrict__ lse_t, bool packed_lse, int64_t outer,
                                                int64_t length, int64_t inner, at::opmath_type<scalar_t> inv_T,
                                                scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= inner) return;  // no block-wide synchronisation below
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t k = o * inner + i;  // the pack's first pixel
    Pack<acc_t, VEC> g;
    if constexpr (kSum) {
      const acc_t scaled = static_cast<acc_t>(static_cast<double>(grad[0]) * factor[0]);
      // the pack's slots in one load where aligned (a 2-byte load a pixel used a quarter of each
      // sector a warp's load touched)
      Pack<int16_t, VEC> kept = {};
      if (slots != nullptr) kept = load_values<VEC>(slots + k, 1, packed_pixels);
#pragma unroll
      for (int p = 0; p < VEC; ++p) g.v[p] = slots == nullptr || kept.v[p] >= 0 ? scaled : acc_t(0);
    } else {
      g = load_values<VEC>(grad + o * g_outer + i * g_inner, g_inner, packed_pixels);
    }
    const auto ls64 = load_values<VEC>(lse_s + k, 1, packed_lse);
    const auto lt64 = load_values<VEC>(lse_t + k, 1, packed_lse);
    SplitLse<acc_t> ls[VEC], lt[VEC];
#pragma unroll
    for (int p = 0; p < VEC; ++p) ls[p] = split_lse<acc_t>(ls64.v[p]), lt[p] = split_lse<acc_t>(lt64.v[p]);
    for (int64_t c = blockIdx.z; c < length; c += gridDim.z) {
      const int64_t e = (o * length + c) * inner + i;
      const auto ps = load_pack<VEC>(s + e);
      const auto pt = load_pack<VEC>(t + e);
      Pack<scalar_t, VEC> r;
#pragma unroll
      for (int p = 0; p < VEC; ++p)
        r.v[p] = static_cast<scalar_t>(kl_grad(g.v[p] * inv_T, static_cast<acc_t>(ps.v[p]) * inv_T,
                                               static_cast<acc_t>(pt.v[p]) * inv_T, ls[p], lt[p]));
      store_pack(out + e, r);
    }
  }
}

// ---- host side ---------------------------------------------------------------------------

// The pixel kernels' grid: x over tiles of kThreads packs of `vec` pixels, y over the images
// (grid-strided past 65535).
inline dim3 kl_pixel_grid(int64_t outer, int64_t inner, int vec) {
  return dim3(grid_x((inner / vec + kThreads - 1) / kThreads, "student"),
              static_cast<unsigned int>(std::min(outer, kMaxGridYZ)));
}

// The backward's grid: kl_pixel_grid's, with z over groups of kClassesPerThread classes.
inline dim3 kl_pixels_backward_grid(int64_t outer, int64_t length, int64_t inner, int vec) {
  dim3 grid = kl_pixel_grid(outer, inner, vec);
  grid.z = static_cast<unsigned int>(std::min((length + kClassesPerThread - 1) / kClassesPerThread, kMaxGridYZ));
  return grid;
}

// Whether both log-sum-exps may be read in packs of `vec` (i and inner are multiples of it).
inline bool kl_packed_lse(const double* lse_s, const double* lse_t, int vec) {
  return vec > 1 && aligned_for(lse_s, vec, sizeof(double)) && aligned_for(lse_t, vec, sizeof(double));
}

// Packs of 16 bytes where every pointer allows them and the contiguous dim is a multiple of the
// pack (so every pack starts aligned); else packs of one element.
template <typename scalar_t>
inline bool kl_use_packs(int64_t length, int64_t inner, std::initializer_list<const void*> pointers) {
  constexpr int V = pack_size<scalar_t>();
  if ((inner == 1 ? length : inner) % V != 0) return false;
  for (const void* p : pointers)
    if (!aligned_for(p, V, sizeof(scalar_t))) return false;
  return true;
}

}  // namespace idd_ops
