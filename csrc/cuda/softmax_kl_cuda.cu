// KL between temperature softmaxes along the middle dim of [outer, length, inner] tensors, on CUDA,
// in one read of student and teacher per pass:
// an online softmax (common/softmax_kl_online.h) forward and a one-read backward, for both
// layouts the op serves:
//   pixel KD [B, K, H*W] (inner > 1): in the forward a thread owns a pixel and walks the K
//     classes in chunks held in registers, every load of a chunk in flight at once; the
//     backward streams the tensors in memory order, a 16-byte pack per thread;
//   CWD [B*C, H*W, 1] (inner == 1): a block (long rows) or a warp (short rows) per row, 16-byte
//     packs along the row, partial sums merged by shuffles.
// One launch per pass; outputs are written, never zero-filled first.
//
// Bytes and predicted H200 time (4.8 TB/s datasheet; memory-bound: about 2.3 exp and 15 other
// flops per element, far under the FP32/MUFU rates), float32 at benchmarks/cases.py's shapes:
//   pixel KD B=8 K=19 512x1024: forward reads s, t 2 x 318.8 MB, writes kl 16.8 MB and the
//     float64 lse_s, lse_t 2 x 33.6 MB = 722 MB: 0.15 ms (the earlier two-pass kernel read s,
//     t twice: 1.33 GB, plus three zero fills); backward reads s, t and the three per-pixel
//     values, writes the gradient: 1040 MB, 0.22 ms.
//   CWD B=8 C=512 64x128: forward 268 MB: 0.056 ms; backward 403 MB: 0.084 ms.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/checks.h"
#include "../common/softmax_kl_online.h"
#include "cuda_utils.cuh"
#include "vectorized.cuh"

namespace idd_ops {
namespace {

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

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads, pixel_forward_blocks_per_sm<at::opmath_type<scalar_t>>())
    kl_pixels_forward(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t outer, int64_t length,
                      int64_t inner, at::opmath_type<scalar_t> inv_T, at::opmath_type<scalar_t>* __restrict__ kl,
                      double* __restrict__ lse_s, double* __restrict__ lse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int CH = sizeof(acc_t) == 8 ? 4 : 8;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= inner) return;  // no block-wide synchronisation below
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t base = o * length * inner + i;
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
    const SoftmaxKLVector<acc_t> r = st.finish();
    const int64_t k = o * inner + i;
    kl[k] = r.kl;
    lse_s[k] = r.lse_s;
    lse_t[k] = r.lse_t;
  }
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

template <typename scalar_t, int VEC>
__global__ void __launch_bounds__(kThreads, pixel_backward_blocks_per_sm<VEC>())
    kl_pixels_backward(const at::opmath_type<scalar_t>* __restrict__ grad, int64_t g_outer, int64_t g_inner,
                       bool packed_grad, const scalar_t* __restrict__ s, const scalar_t* __restrict__ t,
                       const double* __restrict__ lse_s, const double* __restrict__ lse_t, bool packed_lse,
                       int64_t outer,
                       int64_t length, int64_t inner, at::opmath_type<scalar_t> inv_T, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC;
  if (i >= inner) return;  // no block-wide synchronisation below
  for (int64_t o = blockIdx.y; o < outer; o += gridDim.y) {
    const int64_t k = o * inner + i;  // the pack's first pixel
    const auto g = load_values<VEC>(grad + o * g_outer + i * g_inner, g_inner, packed_grad);
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

// ---- contiguous vectors (inner == 1): CWD rows -------------------------------------------

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

template <typename scalar_t, int VEC, int ROW_THREADS>
__global__ void __launch_bounds__(kThreads)
    kl_rows_forward(const scalar_t* __restrict__ s, const scalar_t* __restrict__ t, int64_t outer, int64_t length,
                    at::opmath_type<scalar_t> inv_T, at::opmath_type<scalar_t>* __restrict__ kl,
                    double* __restrict__ lse_s, double* __restrict__ lse_t) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRows = kThreads / ROW_THREADS, kStep = ROW_THREADS * VEC;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / ROW_THREADS;
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
  if (lane == 0 && row < outer) {
    const SoftmaxKLVector<acc_t> r = st.finish();
    kl[row] = r.kl;
    lse_s[row] = r.lse_s;
    lse_t[row] = r.lse_t;
  }
}

template <typename scalar_t, int VEC, int ROW_THREADS>
__global__ void __launch_bounds__(kThreads)
    kl_rows_backward(const at::opmath_type<scalar_t>* __restrict__ grad, int64_t g_outer, int64_t g_inner,
                       const scalar_t* __restrict__ s,
                     const scalar_t* __restrict__ t, const double* __restrict__ lse_s,
                     const double* __restrict__ lse_t, int64_t outer, int64_t length,
                     at::opmath_type<scalar_t> inv_T, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int kRows = kThreads / ROW_THREADS, kStep = ROW_THREADS * VEC;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRows + threadIdx.x / ROW_THREADS;
  if (row >= outer) return;  // no block-wide synchronisation below
  const int lane = threadIdx.x % ROW_THREADS;
  const acc_t coef = grad[row * g_outer] * inv_T;
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

// ---- host side -----------------------------------------------------------------------------

// A block per row from this many elements on (two packs per thread and more), else a warp.
template <int VEC>
bool block_per_row(int64_t length) {
  return length >= 2 * kThreads * VEC;
}

unsigned int row_grid(int64_t outer, int rows_per_block) {
  return grid_x((outer + rows_per_block - 1) / rows_per_block, "student");
}

// The pixel kernels' grid: x over tiles of kThreads packs of `vec` pixels, y over the images
// (grid-strided past 65535).
dim3 pixel_grid(int64_t outer, int64_t inner, int vec) {
  return dim3(grid_x((inner / vec + kThreads - 1) / kThreads, "student"),
              static_cast<unsigned int>(std::min(outer, kMaxGridYZ)));
}

// Packs of 16 bytes where every pointer allows them and the contiguous dim is a multiple of the
// pack (so every pack starts aligned); else packs of one element.
template <typename scalar_t>
bool use_packs(int64_t length, int64_t inner, std::initializer_list<const void*> pointers) {
  constexpr int V = pack_size<scalar_t>();
  if ((inner == 1 ? length : inner) % V != 0) return false;
  for (const void* p : pointers)
    if (!aligned_for(p, V, sizeof(scalar_t))) return false;
  return true;
}

template <typename scalar_t, int VEC>
void launch_forward(const scalar_t* s, const scalar_t* t, int64_t outer, int64_t length, int64_t inner,
                    at::opmath_type<scalar_t> inv_T, at::opmath_type<scalar_t>* kl, double* lse_s, double* lse_t,
                    cudaStream_t stream) {
  if (inner > 1) {  // a pixel per thread, whatever the packs allow (kl_pixels_forward)
    kl_pixels_forward<scalar_t><<<pixel_grid(outer, inner, 1), kThreads, 0, stream>>>(s, t, outer, length, inner,
                                                                                      inv_T, kl, lse_s, lse_t);
  } else if (block_per_row<VEC>(length)) {
    kl_rows_forward<scalar_t, VEC, kThreads>
        <<<row_grid(outer, 1), kThreads, 0, stream>>>(s, t, outer, length, inv_T, kl, lse_s, lse_t);
  } else {
    kl_rows_forward<scalar_t, VEC, 32>
        <<<row_grid(outer, kThreads / 32), kThreads, 0, stream>>>(s, t, outer, length, inv_T, kl, lse_s, lse_t);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int VEC>
void launch_backward(const at::opmath_type<scalar_t>* grad, int64_t g_outer, int64_t g_inner, const scalar_t* s,
                     const scalar_t* t, const double* lse_s, const double* lse_t, int64_t outer, int64_t length,
                     int64_t inner,
                     at::opmath_type<scalar_t> inv_T, scalar_t* out, cudaStream_t stream) {
  if (inner > 1) {
    using acc_t = at::opmath_type<scalar_t>;
    const int64_t groups = (length + kClassesPerThread - 1) / kClassesPerThread;
    dim3 grid = pixel_grid(outer, inner, VEC);
    grid.z = static_cast<unsigned int>(std::min(groups, kMaxGridYZ));
    // packs of the per-pixel values where every pack starts aligned (i and inner are multiples of VEC)
    const bool packed_grad = VEC > 1 && g_inner == 1 && g_outer % VEC == 0 && aligned_for(grad, VEC, sizeof(acc_t));
    const bool packed_lse = VEC > 1 && aligned_for(lse_s, VEC, sizeof(double)) && aligned_for(lse_t, VEC, sizeof(double));
    kl_pixels_backward<scalar_t, VEC><<<grid, kThreads, 0, stream>>>(grad, g_outer, g_inner, packed_grad, s, t, lse_s,
                                                                     lse_t, packed_lse, outer, length, inner, inv_T,
                                                                     out);
  } else if (block_per_row<VEC>(length)) {
    kl_rows_backward<scalar_t, VEC, kThreads><<<row_grid(outer, 1), kThreads, 0, stream>>>(
        grad, g_outer, g_inner, s, t, lse_s, lse_t, outer, length, inv_T, out);
  } else {
    kl_rows_backward<scalar_t, VEC, 32><<<row_grid(outer, kThreads / 32), kThreads, 0, stream>>>(
        grad, g_outer, g_inner, s, t, lse_s, lse_t, outer, length, inv_T, out);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_kernel(const at::Tensor& student, const at::Tensor& teacher,
                                                                double temperature) {
  check_softmax_kl_inputs(student, teacher, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto options = s.options().dtype(acc_dtype(s.scalar_type()));
  if (s.numel() == 0) {  // length 0 leaves [outer, inner] outputs with nothing summed: zeros
    at::Tensor kl = at::zeros({outer, inner}, options), lse = at::zeros({outer, inner}, options.dtype(at::kDouble));
    return {kl, lse, at::zeros_like(lse)};
  }
  at::Tensor kl = at::empty({outer, inner}, options);
  at::Tensor lse_s = at::empty_like(kl, options.dtype(at::kDouble)), lse_t = at::empty_like(lse_s);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    if (use_packs<scalar_t>(length, inner, {sp, tp}))
      launch_forward<scalar_t, pack_size<scalar_t>()>(sp, tp, outer, length, inner, inv_T, kl.data_ptr<acc_t>(),
                                                      lse_s.data_ptr<double>(), lse_t.data_ptr<double>(), stream);
    else
      launch_forward<scalar_t, 1>(sp, tp, outer, length, inner, inv_T, kl.data_ptr<acc_t>(),
                                  lse_s.data_ptr<double>(), lse_t.data_ptr<double>(), stream);
  });
  return {kl, lse_s, lse_t};
}

at::Tensor softmax_kl_backward_kernel(const at::Tensor& grad_in, const at::Tensor& student, const at::Tensor& teacher,
                                     const at::Tensor& lse_student, const at::Tensor& lse_teacher, double temperature) {
  check_softmax_kl_backward_inputs(grad_in, student, teacher, lse_student, lse_teacher, temperature);
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const auto acc = acc_dtype(s.scalar_type());
  // Read in place with its strides: the gradient of a reduced loss arrives expanded (strides 0),
  // and a contiguous copy would be one more launch and pass.
  const at::Tensor grad = grad_in.to(acc);
  const at::Tensor ls = lse_student.contiguous(), lt = lse_teacher.contiguous();  // float64, checked
  at::Tensor out = at::empty_like(s);
  if (s.numel() == 0) return out;
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t* gp = grad.const_data_ptr<acc_t>();
    const double* lsp = ls.const_data_ptr<double>();
    const double* ltp = lt.const_data_ptr<double>();
    const int64_t g_outer = grad.stride(0), g_inner = grad.stride(1);
    if (use_packs<scalar_t>(length, inner, {sp, tp, op}))
      launch_backward<scalar_t, pack_size<scalar_t>()>(gp, g_outer, g_inner, sp, tp, lsp, ltp, outer, length, inner,
                                                       inv_T, op, stream);
    else
      launch_backward<scalar_t, 1>(gp, g_outer, g_inner, sp, tp, lsp, ltp, outer, length, inner, inv_T, op, stream);
  });
  return out;
}

}  // namespace

// CUDA implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("softmax_kl", &softmax_kl_kernel);
  m.impl("_softmax_kl_backward", &softmax_kl_backward_kernel);
}

}  // namespace idd_ops
