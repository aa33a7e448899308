#pragma once
// SKD's per-pixel passes on CUDA (affinity_loss_cuda.cu runs them per chunk of images): pooling,
// normalising and differencing both networks with the block sums for the pivot
// (pooled_sums_kernel), the pivot itself (pivot_kernel), the features centred on it
// (centred_kernel), and the backward's u (pivot_u_kernel). The thread layout is the .cu's
// header's: a block is kPixels pooled pixels x kGroups channel groups.
#include <ATen/NumericUtils.h>
#include <ATen/OpMathType.h>

#include <limits>
#include <type_traits>

#include "../composite/affinity_loss.h"
#include "cuda_utils.cuh"

namespace idd_ops {
namespace affinity_cuda {

constexpr int kPixels = 8, kGroups = 32;  // a block: kPixels x kGroups = kThreads
static_assert(kPixels * kGroups == kThreads, "one block of kThreads");

// The GEMM operands' dtype: bfloat16 keeps its own (a pooled value is an input value, exact in
// it; a normalised one is rounded once), the others their accumulation dtype (half: see
// affinity_loss_cuda.cu's header).
template <typename scalar_t>
using gemm_operand_t = std::conditional_t<std::is_same_v<scalar_t, at::BFloat16>, scalar_t, at::opmath_type<scalar_t>>;

// One network's input [k, C, H, W] by strides, and its pooling windows.
struct PoolView {
  int64_t s0, s1, s2, s3, H, W, Wo, pool;
};

// A chunk's GEMM operands, x (rows.us, [k, Cs, P]) and d ([k, C, P]): rows of P pooled pixels,
// one image's rows `us_image` and `d_image` elements after the previous image's. The default
// set keeps them in two tensors (Cs * P and C * P apart); IDD_OPS_CUDA_NEXT=1 interleaves them,
// each image's Cs rows of x followed by its C rows of d ((Cs + C) * P apart), so that one GEMM
// reads x and d as one operand (affinity_loss_cuda.cu).
template <typename op_t>
struct OperandRows {
  op_t* us;
  op_t* d;
  int64_t us_image, d_image;
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

// A whole 2 x 2 window's four values in row-major order (pool 2 away from the border), loaded
// apart from their comparison so that a thread can issue several windows' loads at once.
template <typename acc_t>
struct Quad {
  acc_t a, r, d, e;
};

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Quad<acc_t> load_quad(const scalar_t* __restrict__ x, const PoolView& v, int64_t b,
                                                 int64_t c, const Window& w) {
  const scalar_t* q = x + b * v.s0 + c * v.s1 + w.y0 * v.s2 + w.x0 * v.s3;
  return {static_cast<acc_t>(q[0]), static_cast<acc_t>(q[v.s3]), static_cast<acc_t>(q[v.s2]),
          static_cast<acc_t>(q[v.s2 + v.s3])};
}

// window_max's value over a Quad: the same comparisons in the same order (a NaN taking over).
template <typename acc_t>
__device__ __forceinline__ acc_t quad_max(const Quad<acc_t>& q) {
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  const auto take = [&best](acc_t value) {
    if (value > best || at::_isnan(value)) best = value;
  };
  take(q.a);
  take(q.r);
  take(q.d);
  take(q.e);
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

// One pooled pixel's normalisation, from its float64 sums over channels |s|^2, |t|^2 and
// <e, s + t> (e = s - t; s, t the pooled features before normalisation): S = s / |s| and the
// normalised difference D of affinity_loss_batched.cpp (normalised_difference: D keeps the
// relative accuracy of e). In float64 whatever the input dtype, as the CPU's blocked formulation
// takes them: where the student's scale is not the teacher's, D = S/|S| - T/|T| is a difference
// of terms of size 1, and float32 norms put their relative error (1e-7 and more) into it whole
// (float32 SKD 1.4e-3 off at a student scale of 1e-4 and pool 4, against 9e-6). A few float64
// operations per pooled value, which the input reads outweigh.
struct PixelScale {
  double ns, ns_c, divisor, kt, ks;
  // D = e / |S| + T k, or e / |T| + S k where |S| < |T| (floored norms), k = 1 / |S| - 1 / |T|,
  // taken as -<e, S + T> / ((|S| + |T|) |S| |T|) where neither norm is floored: divided by the
  // larger norm no term exceeds 2, where e / |S| and T k of a student far smaller than its
  // teacher cancel from |T| / |S| and leave D an error of that many roundings
  __device__ __forceinline__ PixelScale(double ss, double tt, double q) {
    const double eps = kAffinityNormEps;
    ns = ::sqrt(ss);
    const double nt = ::sqrt(tt);
    ns_c = ns < eps ? eps : ns;  // a NaN norm stays NaN, as clamp_min's
    const double nt_c = nt < eps ? eps : nt;
    const bool by_t = ns_c < nt_c;
    const double k = (ns < nt ? ns : nt) > eps ? -q / (ns + nt) / ns / nt : 1.0 / ns_c - 1.0 / nt_c;
    divisor = by_t ? nt_c : ns_c;
    kt = by_t ? 0.0 : k;
    ks = by_t ? k : 0.0;
  }
  __device__ __forceinline__ double normalised(double s) const { return s / ns_c; }
  __device__ __forceinline__ double difference(double s, double t) const { return (s - t) / divisor + t * kt + s * ks; }
  // the pixel's columns are centred on the pivot: all of them in the forward, those whose norm
  // is not floored in the backward (affinity_input_gradient)
  __device__ __forceinline__ bool floored() const { return !(ns > kAffinityNormEps); }
};

// The sum over the 8 pixels of a warp's 8-lane segment (the block's x dimension), in a fixed
// order; every lane of the warp must call it.
__device__ __forceinline__ double pixels_sum(double v) {
  for (int lane = kPixels / 2; lane > 0; lane /= 2) v += __shfl_xor_sync(0xffffffffu, v, lane, kPixels);
  return v;
}

// A chunk's first pass: the pooled values, raw, in us [k, Cs, P] and d [k, C, P] (the teacher's
// in d; in gemm_operand_t, which holds an input value exactly; rows of P, each image's
// rows.us_image and rows.d_image elements after the previous one's: OperandRows), each pixel's
// float64 sums over channels in stats [k, 3, P] (|s|^2, |t|^2, <e, s + t>), and the float64 sums
// of S and D over the block's pixels in partials [k, blocks, Cs + C] (S's Cs, then D's C), which
// the pivot
// (affinity_pivot) adds up. grid (ceil(P / kPixels), k).
//
// kAhead: channels whose whole 2 x 2 windows a thread loads (both networks') before comparing
// any; the sums add in channel order either way, so the same bits. With one (the default) a
// thread has two windows' 8 loads in flight: the H200 took 0.12 ms a launch (4 launches, 0.48 ms
// of SKD's 3.2 ms forward+backward at pool 2), about 1.1 TB/s for its 134 MB of reads a chunk.
// IDD_OPS_CUDA_NEXT=1 takes kPooledAhead (no GPU has run it yet).
constexpr int kPooledAhead = 2;

template <typename scalar_t, int kAhead>
__global__ void pooled_sums_kernel(const scalar_t* __restrict__ student, PoolView vs,
                                   const scalar_t* __restrict__ teacher, PoolView vt, int64_t Cs, int64_t Ct, int64_t P,
                                   OperandRows<gemm_operand_t<scalar_t>> rows, double* __restrict__ stats,
                                   double* __restrict__ partials) {
  using acc_t = at::opmath_type<scalar_t>;
  using op_t = gemm_operand_t<scalar_t>;
  __shared__ double part[kGroups][kPixels];
  const int64_t b = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const int64_t C = Cs > Ct ? Cs : Ct;  // rows of d
  const bool live = p < P;
  op_t* u = rows.us + b * rows.us_image + p;
  op_t* w = rows.d + b * rows.d_image + p;
  double ss = 0, tt = 0, q = 0;
  if constexpr (kAhead == 1) {  // the default's walk as the H200 ran it (the switch-on deletes it)
    if (live) {
      const Window win = window_of(vs, p);  // the teacher's too (same size, checked)
      for (int64_t c = threadIdx.y; c < C; c += kGroups) {
        const acc_t s = c < Cs ? window_max<scalar_t, acc_t>(student, vs, b, c, win) : acc_t(0);
        const acc_t t = c < Ct ? window_max<scalar_t, acc_t>(teacher, vt, b, c, win) : acc_t(0);
        const double sw = s, tw = t;
        ss += sw * sw;
        tt += tw * tw;
        q += (sw + tw) * (sw - tw);
        if (c < Cs) u[c * P] = static_cast<op_t>(s);
        w[c * P] = static_cast<op_t>(t);
      }
    }
  } else {
    const auto add = [&](int64_t c, acc_t s, acc_t t) {
      const double sw = s, tw = t;
      ss += sw * sw;
      tt += tw * tw;
      q += (sw + tw) * (sw - tw);
      if (c < Cs) u[c * P] = static_cast<op_t>(s);
      w[c * P] = static_cast<op_t>(t);
    };
    if (live) {
      const Window win = window_of(vs, p);
      if (vs.pool == 2 && win.y1 - win.y0 == 2 && win.x1 - win.x0 == 2) {
        for (int64_t c0 = threadIdx.y; c0 < C; c0 += kAhead * kGroups) {
          Quad<acc_t> qs[kAhead] = {}, qt[kAhead] = {};
#pragma unroll
          for (int j = 0; j < kAhead; ++j) {  // every load of the step, then the comparisons
            const int64_t c = c0 + j * kGroups;
            if (c < Cs) qs[j] = load_quad<scalar_t, acc_t>(student, vs, b, c, win);
            if (c < Ct) qt[j] = load_quad<scalar_t, acc_t>(teacher, vt, b, c, win);
          }
#pragma unroll
          for (int j = 0; j < kAhead; ++j) {
            const int64_t c = c0 + j * kGroups;
            if (c < C) add(c, c < Cs ? quad_max(qs[j]) : acc_t(0), c < Ct ? quad_max(qt[j]) : acc_t(0));
          }
        }
      } else {
        for (int64_t c = threadIdx.y; c < C; c += kGroups)
          add(c, c < Cs ? window_max<scalar_t, acc_t>(student, vs, b, c, win) : acc_t(0),
              c < Ct ? window_max<scalar_t, acc_t>(teacher, vt, b, c, win) : acc_t(0));
      }
    }
  }
  ss = groups_sum(ss, part);
  tt = groups_sum(tt, part);
  q = groups_sum(q, part);
  if (live && threadIdx.y == 0) {
    double* st = stats + b * 3 * P + p;
    st[0] = ss;
    st[P] = tt;
    st[2 * P] = q;
  }
  const PixelScale scale(ss, tt, q);
  double* out = partials + (b * gridDim.x + blockIdx.x) * (Cs + C);
  for (int64_t c0 = 0; c0 < C; c0 += kGroups) {  // whole warps, past C and P too: pixels_sum
    const int64_t c = c0 + threadIdx.y;
    double sn = 0, dn = 0;
    if (live && c < C) {
      const double s = c < Cs ? static_cast<double>(static_cast<acc_t>(u[c * P])) : 0.0;
      const double t = static_cast<acc_t>(w[c * P]);
      sn = scale.normalised(s);
      dn = scale.difference(s, t);
    }
    sn = pixels_sum(sn);
    dn = pixels_sum(dn);
    if (threadIdx.x == 0 && c < C) {
      if (c < Cs) out[c] = sn;
      out[Cs + c] = dn;
    }
  }
}

// The chunk's pivot (affinity_pivot) from pooled_sums_kernel's block sums [k, blocks, Cs + C]:
// m_s [k, Cs] and m_d [k, C] (float64; each channel's blocks added in order), and alpha =
// <m_D, 2 m_T + m_D> in parts, one per kThreads channels: alpha_parts [k, tiles] (alpha_of adds
// them). grid (tiles, k), tiles = ceil(C / kThreads).
//
// kAhead: block sums each thread loads before adding any (the adds in block order either way, so
// the same bits). The grid is small (2 x 4 blocks at the report's SKD shape), so each thread's
// walk over its column is the kernel's time: with one load in flight (kAhead 1, the default) the
// H200 took 0.17 ms a launch for 256 blocks of sums, about one memory round trip each.
// IDD_OPS_CUDA_NEXT=1 takes kPivotAhead (no GPU has run it yet).
constexpr int kPivotAhead = 16;

template <int kAhead>
__global__ void pivot_kernel(const double* __restrict__ sums, int64_t blocks, int64_t Cs, int64_t C, int64_t P,
                             double* __restrict__ m_s, double* __restrict__ m_d, double* __restrict__ alpha_parts) {
  __shared__ double scratch[kThreads];
  const int64_t b = blockIdx.y, c = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  double part = 0;
  if (c < C) {
    const int64_t row = Cs + C;
    const double* col = sums + b * blocks * row;
    const bool student = c < Cs;
    double ss = 0, sd = 0;
    int64_t k = 0;
    for (; k + kAhead <= blocks; k += kAhead) {
      double vs[kAhead], vd[kAhead];
#pragma unroll
      for (int j = 0; j < kAhead; ++j) {
        vs[j] = student ? col[(k + j) * row + c] : 0.0;
        vd[j] = col[(k + j) * row + Cs + c];
      }
#pragma unroll
      for (int j = 0; j < kAhead; ++j) {
        if (student) ss += vs[j];
        sd += vd[j];
      }
    }
    for (; k < blocks; ++k) {
      if (student) ss += col[k * row + c];
      sd += col[k * row + Cs + c];
    }
    const double ms = ss / P, md = sd / P;
    if (c < Cs) m_s[b * Cs + c] = ms;
    m_d[b * C + c] = md;
    part = md * (2 * (ms - md) + md);
  }
  part = block_sum(part, scratch);
  if (threadIdx.x == 0) alpha_parts[b * gridDim.x + blockIdx.x] = part;
}

__device__ __forceinline__ double alpha_of(const double* parts, int64_t tiles) {
  double alpha = 0;
  for (int64_t t = 0; t < tiles; ++t) alpha += parts[t];
  return alpha;
}

// The backward's u = G_xx m_D + G_xd m_T [k, Cs] (pivot_u; float64) from the kept Grams g_ss
// [k, Cs, Cs] and g_sd [k, Cs, Ct] (contiguous, the accumulation dtype): a warp a row, its lanes'
// products added in a fixed order. grid (ceil(Cs / warps), k), kThreads threads.
template <typename acc_t>
__global__ void pivot_u_kernel(const acc_t* __restrict__ g_ss, const acc_t* __restrict__ g_sd,
                               const double* __restrict__ m_s, const double* __restrict__ m_d, int64_t Cs,
                               int64_t Ct, double* __restrict__ u) {
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
    for (int64_t j = lane; j < Cs; j += 32) sum += static_cast<double>(ss[j]) * md[j];
    for (int64_t j = lane; j < Ct; j += 32) sum += static_cast<double>(sd[j]) * ((j < Cs ? ms[j] : 0.0) - md[j]);
  }
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (i < Cs && lane == 0) u[b * Cs + i] = sum;
}

// A chunk's second pass: from the raw values and stats of pooled_sums_kernel, the centred
// x = S - m_S into rows.us and d = D - m_D into rows.d (gemm_operand_t: rounded once, at the size
// of the spread about the means), and beta [k, P] = <m_D, x> + <m_T, d> (float64; m_T = m_S -
// m_D, m_S taken as 0 past Cs). m_s [k, Cs], m_d [k, C] float64. `backward`: a pixel whose norm is floored
// keeps S and D uncentred (affinity_input_gradient), and the student's norms go to norms [k, P].
// grid (ceil(P / kPixels), k).
//
// kAhead: channels whose two values a thread loads before centring any (the sum adds in channel
// order either way: the same bits). With one (the default) a thread has 2 loads in flight: the
// H200 took 0.07 ms a launch (4 launches, 0.29 ms of SKD's 3.2 ms forward+backward), about 0.9
// TB/s for the 67 MB it reads and writes a chunk. IDD_OPS_CUDA_NEXT=1 takes kCentredAhead.
constexpr int kCentredAhead = 4;

template <typename scalar_t, int kAhead>
__global__ void centred_kernel(OperandRows<gemm_operand_t<scalar_t>> rows, const double* __restrict__ stats,
                               const double* __restrict__ m_s, const double* __restrict__ m_d, int64_t Cs, int64_t Ct,
                               int64_t P, bool backward, double* __restrict__ beta, double* __restrict__ norms) {
  using acc_t = at::opmath_type<scalar_t>;
  using op_t = gemm_operand_t<scalar_t>;
  __shared__ double part[kGroups][kPixels];
  const int64_t b = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const int64_t C = Cs > Ct ? Cs : Ct;
  const bool live = p < P;
  op_t* u = rows.us + b * rows.us_image + p;
  op_t* w = rows.d + b * rows.d_image + p;
  const double* ms = m_s + b * Cs;
  const double* md = m_d + b * C;
  double sum = 0;
  PixelScale scale(0, 0, 0);
  if (live) {
    const double* st = stats + b * 3 * P + p;
    scale = PixelScale(st[0], st[P], st[2 * P]);
    const double centre = backward && scale.floored() ? 0.0 : 1.0;
    if constexpr (kAhead == 1) {  // the default's walk as the H200 ran it (the switch-on deletes it)
      for (int64_t c = threadIdx.y; c < C; c += kGroups) {
        const double s = c < Cs ? static_cast<double>(static_cast<acc_t>(u[c * P])) : 0.0;
        const double t = static_cast<acc_t>(w[c * P]);
        const double mean_s = c < Cs ? ms[c] : 0.0;
        const double x = scale.normalised(s) - centre * mean_s, dd = scale.difference(s, t) - centre * md[c];
        sum += md[c] * x + (mean_s - md[c]) * dd;
        if (c < Cs) u[c * P] = static_cast<op_t>(x);
        w[c * P] = static_cast<op_t>(dd);
      }
    } else {
      for (int64_t c0 = threadIdx.y; c0 < C; c0 += kAhead * kGroups) {
        double sv[kAhead], tv[kAhead];
#pragma unroll
        for (int j = 0; j < kAhead; ++j) {  // every load of the step, then the stores
          const int64_t c = c0 + j * kGroups;
          sv[j] = c < Cs ? static_cast<double>(static_cast<acc_t>(u[c * P])) : 0.0;
          tv[j] = c < C ? static_cast<double>(static_cast<acc_t>(w[c * P])) : 0.0;
        }
#pragma unroll
        for (int j = 0; j < kAhead; ++j) {
          const int64_t c = c0 + j * kGroups;
          if (c >= C) break;
          const double s = sv[j], t = tv[j];
          const double mean_s = c < Cs ? ms[c] : 0.0;
          const double x = scale.normalised(s) - centre * mean_s, dd = scale.difference(s, t) - centre * md[c];
          sum += md[c] * x + (mean_s - md[c]) * dd;
          if (c < Cs) u[c * P] = static_cast<op_t>(x);
          w[c * P] = static_cast<op_t>(dd);
        }
      }
    }
  }
  sum = groups_sum(sum, part);
  if (!live || threadIdx.y != 0) return;
  beta[b * P + p] = sum;
  if (norms != nullptr) norms[b * P + p] = scale.ns;
}

}  // namespace affinity_cuda
}  // namespace idd_ops
