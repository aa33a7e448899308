// SKD (affinity_loss) on CUDA. By default the composite runs (affinity_loss.cpp: the blocked
// formulation). Under IDD_OPS_CUDA_NEXT=1 the batched formulation (affinity_loss.h) runs with its
// pointwise work in three kernels around the GEMMs, per chunk of pool * pool images:
//   forward:  pool + normalise + difference (1) -> G_ss, G_sd, G_dd (3 GEMMs) -> the four inner
//             products of differenced_affinity_sum, and G_sd's first Ct columns kept for the
//             backward (1); then one launch for all images turns the per-tile partial sums into
//             the per-image means.
//   backward: the GEMM operands G_sd and G_st = G_ss - G_sd (1) -> pool + normalise + difference
//             as forward (1) -> G_sd U_S and G_st D (2 GEMMs) -> through the normalisation into
//             each window's argmax, zeros elsewhere (1).
// The student's gradient G_ss U_S - G_st U_T is taken as G_sd U_S + G_st D (T = S - D): both
// terms shrink as the student nears the teacher, so a rounding error of the operands stays
// relative to the gradient rather than to G_ss U_S (the forward's D keeps the loss so too).
// G_sd is kept, not G_st: formed again as G_ss - G_st it would cancel (affinity_saved_gram).
// That lets bfloat16 inputs keep their dtype for the GEMM operands (gemm_operand_t) and multiply
// on tensor cores into float32, as fast as autocast's GEMMs (float32 operands ran 3x slower than
// the eager reference under bf16 autocast on an H200: 17 ms against 5 ms a step). Half keeps
// float32 operands: G_st's entries reach P (past half's 65504 at P > 65504 pooled pixels) and a
// difference near the teacher (|D| ~ 1e-5) is a half subnormal, which bfloat16's float32 range
// avoids; and cuBLAS refuses half operands with float32 results under allow_fp16_accumulation.
// At one chunk that is 6 + 5 launches, where the ATen formulation takes about 60. The reductions
// run in a fixed order (no atomics): the same bits on every run.
// Student and teacher of different dtypes, and empty inputs, take the ATen formulation.
//
// Threads: a block is 8 pooled pixels x 32 channel groups (a warp: 8 consecutive windows of 4
// channels, at pool 2 a 64-byte run per row and channel); each thread walks its group's channels,
// and the per-pixel sums over channels are added across the groups in shared memory in a fixed
// order. Many groups rather than many pixels: at the Cityscapes shape (P = 2048 pooled pixels, a
// chunk of 4 images, 2048 teacher channels) that is 1024 blocks with 64 channels a thread (about
// 2.6 waves at 3 blocks a multiprocessor: nvcc gives these kernels up to 80 registers a thread on
// sm_90, so 3 fit), where 32 pixels a block would give 256 blocks and 256 channels a thread.
// A thread keeps a window of each network in flight (window_max).
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <torch/version.h>

#include <algorithm>
#include <limits>
#include <type_traits>

#include "../common/checks.h"
#include "../common/cuda_next.h"
#include "../composite/affinity_loss.h"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace {

constexpr int kPixels = 8, kGroups = 32;  // a block: kPixels x kGroups = kThreads
static_assert(kPixels * kGroups == kThreads, "one block of kThreads");
constexpr int kTile = 32;  // the Gram tail's square tiles: kTile columns x kTile rows

// The GEMM operands' dtype: bfloat16 keeps its own (a pooled value is an input value, exact in
// it; a normalised one is rounded once), the others their accumulation dtype (half: see above).
template <typename scalar_t>
using gemm_operand_t = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, scalar_t, at::opmath_type<scalar_t>>;

// One network's input [k, C, H, W] by strides, and its pooling windows.
struct PoolView {
  int64_t s0, s1, s2, s3, H, W, Wo, pool;
};

// The input rows [y0, y1) and columns [x0, x1) of pooled pixel p's window (ceil mode: cut by
// the border).
struct Window {
  int64_t y0, x0, y1, x1;
};

__device__ __forceinline__ Window window_of(const PoolView& v, int64_t p) {
  const int64_t y0 = (p / v.Wo) * v.pool, x0 = (p % v.Wo) * v.pool;
  return {y0, x0, y0 + v.pool < v.H ? y0 + v.pool : v.H, x0 + v.pool < v.W ? x0 + v.pool : v.W};
}

// Max over the window of channel c of image b, and its flat index y * W + x: the first maximum
// in row-major order, a NaN taking over as max_pool2d's does (so the argmax is ATen's). Whole
// 2 x 2 windows (pool 2, the default, away from the border) issue their four loads before any
// comparison: in the loop each load would wait behind the previous one's branch.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t window_max(const scalar_t* __restrict__ x, const PoolView& v, int64_t b, int64_t c,
                                            const Window& w, int64_t* where = nullptr) {
  const int64_t y0 = w.y0, x0 = w.x0;
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int64_t at = y0 * v.W + x0;
  const auto take = [&](acc_t value, int64_t y, int64_t xx) {
    if (value > best || at::_isnan(value)) {
      best = value;
      at = y * v.W + xx;
    }
  };
  const scalar_t* plane = x + b * v.s0 + c * v.s1;
  if (v.pool == 2 && w.y1 - y0 == 2 && w.x1 - x0 == 2) {
    const scalar_t* q = plane + y0 * v.s2 + x0 * v.s3;
    const acc_t a = static_cast<acc_t>(q[0]), r = static_cast<acc_t>(q[v.s3]);
    const acc_t d = static_cast<acc_t>(q[v.s2]), e = static_cast<acc_t>(q[v.s2 + v.s3]);
    take(a, y0, x0);
    take(r, y0, x0 + 1);
    take(d, y0 + 1, x0);
    take(e, y0 + 1, x0 + 1);
  } else {
    for (int64_t y = y0; y < w.y1; ++y)
      for (int64_t xx = x0; xx < w.x1; ++xx) take(static_cast<acc_t>(plane[y * v.s2 + xx * v.s3]), y, xx);
  }
  if (where != nullptr) *where = at;
  return best;
}

// Adds the kGroups partial sums of each pixel in `part` [kGroups][kPixels] in group order;
// every thread gets its pixel's total. Every thread of the block must call it.
template <typename acc_t>
__device__ __forceinline__ acc_t groups_sum(acc_t value, acc_t (*part)[kPixels]) {
  part[threadIdx.y][threadIdx.x] = value;
  __syncthreads();
  acc_t total = 0;
#pragma unroll
  for (int g = 0; g < kGroups; ++g) total += part[g][threadIdx.x];
  __syncthreads();  // part is reused right after
  return total;
}

// Pooled, L2-normalised (over channels, norm floored at kAffinityNormEps) features of a chunk:
// us [k, Cs, P] and the normalised difference d [k, C, P] of affinity_loss_batched.cpp
// (normalised_difference: D keeps the relative accuracy of S - T), in gemm_operand_t; the
// student's norms [k, P] where `norms` is given (the backward). The first pass stores the pooled
// values raw (the teacher's in d) and sums the squares; the second pass rereads what the same
// thread stored and normalises in place. grid (ceil(P / kPixels), k).
template <typename scalar_t>
__global__ void pooled_normalised_kernel(const scalar_t* __restrict__ student, PoolView vs,
                                         const scalar_t* __restrict__ teacher, PoolView vt, int64_t Cs, int64_t Ct,
                                         int64_t P, gemm_operand_t<scalar_t>* __restrict__ us,
                                         gemm_operand_t<scalar_t>* __restrict__ d,
                                         at::opmath_type<scalar_t>* __restrict__ norms) {
  using acc_t = at::opmath_type<scalar_t>;
  using op_t = gemm_operand_t<scalar_t>;
  // The norms, <e, S + T> and D in float64 whatever the input dtype, as the CPU's blocked
  // formulation takes them: where the student's scale is not the teacher's, D = S/|S| - T/|T| is
  // a difference of terms of size 1, and float32 norms put their relative error (1e-7 and more)
  // into it whole (float32 SKD 1.4e-3 off at a student scale of 1e-4 and pool 4, against 9e-6).
  // A few float64 operations per pooled value, which the input reads outweigh.
  using wide_t = double;
  __shared__ wide_t part[kGroups][kPixels];
  const int64_t b = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const int64_t C = Cs > Ct ? Cs : Ct;  // rows of d
  const bool live = p < P;
  op_t* u = us + b * Cs * P + p;
  op_t* w = d + b * C * P + p;
  wide_t ss = 0, tt = 0, q = 0;
  if (live) {
    const Window win = window_of(vs, p);  // the teacher's too (same size, checked)
    for (int64_t c = threadIdx.y; c < C; c += kGroups) {
      const acc_t s = c < Cs ? window_max<scalar_t, acc_t>(student, vs, b, c, win) : acc_t(0);
      const acc_t t = c < Ct ? window_max<scalar_t, acc_t>(teacher, vt, b, c, win) : acc_t(0);
      const wide_t sw = s, tw = t;
      ss += sw * sw;
      tt += tw * tw;
      q += (sw + tw) * (sw - tw);
      if (c < Cs) u[c * P] = static_cast<op_t>(s);
      w[c * P] = static_cast<op_t>(t);
    }
  }
  ss = groups_sum(ss, part);
  tt = groups_sum(tt, part);
  q = groups_sum(q, part);
  if (!live) return;
  const wide_t eps = kAffinityNormEps;
  const wide_t ns = ::sqrt(ss), nt = ::sqrt(tt);
  const wide_t ns_c = ns < eps ? eps : ns, nt_c = nt < eps ? eps : nt;  // a NaN norm stays NaN, as clamp_min's
  if (norms != nullptr && threadIdx.y == 0) norms[b * P + p] = static_cast<acc_t>(ns);
  // D = e / |S| + T k, or e / |T| + S k where |S| < |T| (floored norms), k = 1 / |S| - 1 / |T|,
  // taken as -<e, S + T> / ((|S| + |T|) |S| |T|) where neither norm is floored: divided by the
  // larger norm no term exceeds 2, where e / |S| and T k of a student far smaller than its
  // teacher cancel from |T| / |S| and leave D an error of that many roundings
  const bool by_t = ns_c < nt_c;
  const wide_t k = (ns < nt ? ns : nt) > eps ? -q / (ns + nt) / ns / nt : 1.0 / ns_c - 1.0 / nt_c;
  const wide_t divisor = by_t ? nt_c : ns_c, kt = by_t ? 0.0 : k, ks = by_t ? k : 0.0;
  for (int64_t c = threadIdx.y; c < C; c += kGroups) {
    const wide_t s = c < Cs ? static_cast<wide_t>(static_cast<acc_t>(u[c * P])) : 0.0;
    const wide_t t = static_cast<acc_t>(w[c * P]);
    w[c * P] = static_cast<op_t>((s - t) / divisor + t * kt + s * ks);
    if (c < Cs) u[c * P] = static_cast<op_t>(s / ns_c);
  }
}

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

// The four inner products of differenced_affinity_sum over one kTile x kTile tile of the C x C
// grid, in float64, into partials[b, tile]; and the kept G_sd (its first Ct columns) on the
// tile's part of [Cs, Ct]. g_ss [k, Cs, Cs], g_sd [k, Cs, C], g_dd [k, C, C], kept [k, Cs, Ct],
// contiguous.
// The <G_sd, G_sd^T> term reads the mirror tile through shared memory (coalesced both ways).
// grid (tiles * tiles, k), kThreads threads: thread t takes column t % kTile of its tile and every
// (kThreads / kTile)-th row from t / kTile.
template <typename acc_t>
__global__ void gram_tail_kernel(const acc_t* __restrict__ g_ss, const acc_t* __restrict__ g_sd,
                                 const acc_t* __restrict__ g_dd, acc_t* __restrict__ kept, int64_t Cs, int64_t Ct,
                                 int64_t C, double* __restrict__ partials) {
  constexpr int kRowStep = kThreads / kTile;
  __shared__ acc_t mirror[kTile][kTile + 1];
  __shared__ double scratch[kThreads];
  const int tx = threadIdx.x % kTile, ty = threadIdx.x / kTile;
  const int64_t b = blockIdx.y, tiles = (C + kTile - 1) / kTile;
  const int64_t i0 = (blockIdx.x / tiles) * kTile, j0 = (blockIdx.x % tiles) * kTile, j = j0 + tx;
  const acc_t* ss = g_ss + b * Cs * Cs;
  const acc_t* sd = g_sd + b * Cs * C;
  const acc_t* dd = g_dd + b * C * C;
  acc_t* kept_b = kept + b * Cs * Ct;
  const bool square = i0 < Cs && j0 < Cs;  // the tile meets G_ss: block-uniform
  if (square) {  // mirror[r][c] = G_sd[j0 + r, i0 + c]
    for (int r = ty; r < kTile; r += kRowStep) {
      const int64_t row = j0 + r, col = i0 + tx;
      mirror[r][tx] = row < Cs && col < Cs ? sd[row * C + col] : acc_t(0);
    }
  }
  __syncthreads();
  double sum = 0;
  for (int r = ty; r < kTile; r += kRowStep) {
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
  sum = block_sum(sum, scratch);  // a fixed-order tree (cuda_utils.cuh)
  if (threadIdx.x == 0) partials[b * gridDim.x + blockIdx.x] = sum;
}

// Per-image means: partials [B, tiles] summed in a fixed order, clamped at 0 (rounding), over
// the P * P entries. grid B.
template <typename acc_t>
__global__ void affinity_means_kernel(const double* __restrict__ partials, int64_t tiles, double divisor,
                                      acc_t* __restrict__ loss) {
  __shared__ double scratch[kThreads];
  double sum = 0;
  for (int64_t t = threadIdx.x; t < tiles; t += kThreads) sum += partials[blockIdx.x * tiles + t];
  sum = block_sum(sum, scratch);
  if (threadIdx.x == 0) loss[blockIdx.x] = static_cast<acc_t>((sum < 0 ? 0 : sum) / divisor);  // NaN stays NaN
}

// The student's gradient of a chunk: gu = g1 + g2 [k, Cs, P] (G_sd U_S and G_st D) through the
// normalisation, (gu - u <u, gu>) / |f| (or gu / eps where |f| is floored), times
// grad[b] * scale, into each window's argmax of out [k, Cs, H, W] (contiguous), zeros at the
// window's other elements: every element of out is written. grid (ceil(P / kPixels), k).
template <typename scalar_t>
__global__ void affinity_gradient_kernel(const at::opmath_type<scalar_t>* __restrict__ g1,
                                         const at::opmath_type<scalar_t>* __restrict__ g2,
                                         const gemm_operand_t<scalar_t>* __restrict__ us,
                                         const at::opmath_type<scalar_t>* __restrict__ norms,
                                         const at::opmath_type<scalar_t>* __restrict__ grad, int64_t grad_stride,
                                         double scale, const scalar_t* __restrict__ student, PoolView vs, int64_t Cs,
                                         int64_t P, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part[kGroups][kPixels];
  const int64_t b = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const bool live = p < P;
  const acc_t* ga = g1 + b * Cs * P + p;
  const acc_t* gb = g2 + b * Cs * P + p;
  const gemm_operand_t<scalar_t>* u = us + b * Cs * P + p;
  acc_t along = 0;
  if (live)
    for (int64_t c = threadIdx.y; c < Cs; c += kGroups)
      along += static_cast<acc_t>(u[c * P]) * (ga[c * P] + gb[c * P]);
  along = groups_sum(along, part);
  if (!live) return;
  const acc_t eps = static_cast<acc_t>(kAffinityNormEps), norm = norms[b * P + p];
  const bool floored = !(norm > eps);
  const acc_t factor = static_cast<acc_t>(grad[b * grad_stride] * scale) / (norm < eps ? eps : norm);
  const Window win = window_of(vs, p);
  const int64_t HW = vs.H * vs.W;
  for (int64_t c = threadIdx.y; c < Cs; c += kGroups) {
    const acc_t g = ga[c * P] + gb[c * P], projected = floored ? acc_t(0) : static_cast<acc_t>(u[c * P]) * along;
    const scalar_t value = static_cast<scalar_t>((g - projected) * factor);
    scalar_t* plane = out + (b * Cs + c) * HW;
    if (vs.pool == 1) {
      plane[win.y0 * vs.W + win.x0] = value;
      continue;
    }
    int64_t argmax;
    window_max<scalar_t, acc_t>(student, vs, b, c, win, &argmax);
    for (int64_t y = win.y0; y < win.y1; ++y)
      for (int64_t x = win.x0; x < win.x1; ++x) plane[y * vs.W + x] = y * vs.W + x == argmax ? value : scalar_t(0);
  }
}

PoolView pool_view(const at::Tensor& x, int64_t pool) {
  const int64_t W = x.size(3);
  return {x.stride(0), x.stride(1), x.stride(2), x.stride(3), x.size(2), W, (W + pool - 1) / pool, pool};
}

// Whether the fused kernels take these inputs (checked by check_affinity_loss_inputs); a chunk's
// images are the grid's y dimension (at most 65535).
bool fused_takes(const at::Tensor& student, const at::Tensor& teacher, int64_t pool) {
  const int64_t B = student.size(0);
  return student.scalar_type() == teacher.scalar_type() && B > 0 && student.size(1) > 0 && teacher.size(1) > 0 &&
         student.size(2) > 0 && student.size(3) > 0 && affinity_chunk_images(pool, B) <= kMaxGridYZ;
}

dim3 pixel_grid(int64_t P, int64_t k) {
  return dim3(static_cast<unsigned>((P + kPixels - 1) / kPixels), static_cast<unsigned>(k));
}

// a @ b in `acc` for operands of gemm_operand_t, into `out` where given. ATen's GEMMs with
// bfloat16 operands and float32 results (tensor cores, float32 accumulation) exist from torch
// 2.8, on CUDA; elsewhere (an older torch, the CUDA emulator's CPU tensors) the operands are
// widened to the accumulation dtype first: the same products.
at::Tensor gram(const at::Tensor& a, const at::Tensor& b, at::ScalarType acc, at::Tensor* out = nullptr) {
  if (a.scalar_type() == acc) return out ? at::bmm_out(*out, a, b) : at::bmm(a, b);
#if TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8)
  if (a.is_cuda()) return out ? at::bmm_out(*out, a, b, acc) : at::bmm(a, b, acc);
#endif
  const at::Tensor wa = a.to(acc), wb = b.to(acc);
  return out ? at::bmm_out(*out, wa, wb) : at::bmm(wa, wb);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                  int64_t pool) {
  if (!cuda_next_enabled()) return affinity_loss_composite(student, teacher, pool);
  check_affinity_loss_inputs(student, teacher, pool);
  if (!fused_takes(student, teacher, pool)) return affinity_loss_batched(student, teacher, pool);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto acc = acc_dtype(student.scalar_type());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const PoolView vs = pool_view(student, pool), vt = pool_view(teacher, pool);
  const int64_t P = ((vs.H + pool - 1) / pool) * vs.Wo, tiles = (C + kTile - 1) / kTile;
  const auto opts = student.options().dtype(acc);
  // every chunk writes its images' rows of all four in full: no fills
  at::Tensor gss = at::empty({B, Cs, Cs}, opts), gsd = at::empty({B, Cs, Ct}, opts);
  at::Tensor partials = at::empty({B, tiles * tiles}, opts.dtype(at::kDouble)), loss = at::empty({B}, opts);
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunk = affinity_chunk_images(pool, B);  // memory: affinity_loss_batched.cpp
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "affinity_loss_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using op_t = gemm_operand_t<scalar_t>;
    const auto op_opts = student.options().dtype(c10::CppTypeToScalarType<op_t>::value);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t k = std::min(chunk, B - b0);
      at::Tensor us = at::empty({k, Cs, P}, op_opts), d = at::empty({k, C, P}, op_opts);
      pooled_normalised_kernel<scalar_t><<<pixel_grid(P, k), dim3(kPixels, kGroups), 0, stream>>>(
          student.const_data_ptr<scalar_t>() + b0 * vs.s0, vs, teacher.const_data_ptr<scalar_t>() + b0 * vt.s0, vt,
          Cs, Ct, P, us.mutable_data_ptr<op_t>(), d.mutable_data_ptr<op_t>(), nullptr);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor g_ss = gss.narrow(0, b0, k);
      gram(us, us.transpose(1, 2), acc, &g_ss);
      const at::Tensor g_sd = gram(us, d.transpose(1, 2), acc);  // [k, Cs, C]
      const at::Tensor g_dd = gram(d, d.transpose(1, 2), acc);   // [k, C, C]
      const dim3 tail_grid(static_cast<unsigned>(tiles * tiles), static_cast<unsigned>(k));
      gram_tail_kernel<acc_t><<<tail_grid, kThreads, 0, stream>>>(
          g_ss.const_data_ptr<acc_t>(), g_sd.const_data_ptr<acc_t>(), g_dd.const_data_ptr<acc_t>(),
          gsd.narrow(0, b0, k).mutable_data_ptr<acc_t>(), Cs, Ct, C, partials.narrow(0, b0, k).mutable_data_ptr<double>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    affinity_means_kernel<acc_t><<<B, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), tiles * tiles,
                                                             affinity_mean_divisor(P), loss.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, gss, gsd};
}

at::Tensor affinity_loss_backward_cuda(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                       const at::Tensor& gss_in, const at::Tensor& gsd_in, int64_t pool) {
  if (!cuda_next_enabled()) return affinity_loss_backward_composite(grad, student, teacher, gss_in, gsd_in, pool);
  check_affinity_loss_backward_inputs(grad, student, teacher, gss_in, gsd_in, pool);
  const auto acc = acc_dtype(student.scalar_type());
  if (!fused_takes(student, teacher, pool) || gss_in.scalar_type() != acc || gsd_in.scalar_type() != acc)
    return affinity_loss_backward_batched(grad, student, teacher, gss_in, gsd_in, pool);
  const c10::cuda::CUDAGuard guard(student.device());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1), C = std::max(Cs, Ct);
  const PoolView vs = pool_view(student, pool), vt = pool_view(teacher, pool);
  const int64_t P = ((vs.H + pool - 1) / pool) * vs.Wo;
  const at::Tensor g = grad.scalar_type() == acc ? grad : grad.to(acc);  // [B], any stride (an expanded sum's)
  const at::Tensor gss = gss_in.contiguous(), gsd = gsd_in.contiguous();  // the forward's: already so
  const auto opts = student.options().dtype(acc);
  // every element is written (the windows tile each plane)
  at::Tensor out = at::empty(student.sizes(), student.options().memory_format(at::MemoryFormat::Contiguous));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const int64_t chunk = affinity_chunk_images(pool, B);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "affinity_loss_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    using op_t = gemm_operand_t<scalar_t>;
    const auto op_opts = student.options().dtype(c10::CppTypeToScalarType<op_t>::value);
    for (int64_t b0 = 0; b0 < B; b0 += chunk) {
      const int64_t k = std::min(chunk, B - b0);
      at::Tensor g_sd = at::empty({k, Cs, Cs}, op_opts), g_st = at::empty({k, Cs, Ct}, op_opts);
      gram_operands_kernel<acc_t, op_t><<<blocks_for(k * Cs * C), kThreads, 0, stream>>>(
          gss.const_data_ptr<acc_t>() + b0 * Cs * Cs, gsd.const_data_ptr<acc_t>() + b0 * Cs * Ct, k, Cs, Ct,
          g_sd.mutable_data_ptr<op_t>(), g_st.mutable_data_ptr<op_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor us = at::empty({k, Cs, P}, op_opts), d = at::empty({k, C, P}, op_opts), ns = at::empty({k, P}, opts);
      const scalar_t* xs = student.const_data_ptr<scalar_t>() + b0 * vs.s0;
      pooled_normalised_kernel<scalar_t><<<pixel_grid(P, k), dim3(kPixels, kGroups), 0, stream>>>(
          xs, vs, teacher.const_data_ptr<scalar_t>() + b0 * vt.s0, vt, Cs, Ct, P, us.mutable_data_ptr<op_t>(),
          d.mutable_data_ptr<op_t>(), ns.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      const at::Tensor g1 = gram(g_sd, us, acc), g2 = gram(g_st, d.narrow(1, 0, Ct), acc);  // [k, Cs, P] each
      affinity_gradient_kernel<scalar_t><<<pixel_grid(P, k), dim3(kPixels, kGroups), 0, stream>>>(
          g1.const_data_ptr<acc_t>(), g2.const_data_ptr<acc_t>(), us.const_data_ptr<op_t>(), ns.const_data_ptr<acc_t>(),
          g.const_data_ptr<acc_t>() + b0 * g.stride(0), g.stride(0), 4.0 / affinity_mean_divisor(P), xs, vs, Cs, P,
          out.mutable_data_ptr<scalar_t>() + b0 * Cs * vs.H * vs.W);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(idd_ops, CUDA, m) {
  m.impl("affinity_loss", &affinity_loss_cuda);
  m.impl("_affinity_loss_backward", &affinity_loss_backward_cuda);
}

}  // namespace idd_ops
