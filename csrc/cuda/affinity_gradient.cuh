#pragma once
// SKD's backward pass into the student (affinity_loss_cuda.cu runs it per chunk of images, after
// the backward's GEMMs). The thread layout is affinity_pivot.cuh's: a block is kPixels pooled
// pixels x kGroups channel groups.
#include <ATen/OpMathType.h>

#include "affinity_pivot.cuh"

namespace idd_ops {
namespace affinity_cuda {

// window_max's value and argmax over a Quad: the same comparisons in the same order (a NaN
// taking over); the argmax as the quad's position, 0-3 in row-major order.
template <typename acc_t>
__device__ __forceinline__ int quad_argmax(const Quad<acc_t>& q, acc_t* value) {
  acc_t best = -std::numeric_limits<acc_t>::infinity();
  int at = 0;
  const acc_t v[4] = {q.a, q.r, q.d, q.e};
#pragma unroll
  for (int j = 0; j < 4; ++j)
    if (v[j] > best || at::_isnan(v[j])) {
      best = v[j];
      at = j;
    }
  *value = best;
  return at;
}

// The student's gradient of a chunk (affinity_input_gradient): per pixel, from the GEMMs'
// g1 + g2 [k, Cs, P] (G_xd x and G_xy d; under IDD_OPS_CUDA_NEXT=1, kAhead > 1, g1 is their sum
// from one GEMM and g2 is not read), u [k, Cs] (pivot_u), m_s [k, Cs], alpha (in parts), beta
// [k, P] and the student's norms [k, P] (float64), w = g1 + g2 + u - rho x with rho =
// P (alpha + beta) projected, (w - S <S, w>) / |f|; where the norm is floored (x, d uncentred
// there), w = g1 + g2 + rho m_S with rho = P beta, divided by eps whole. S is the pooled value
// over its norm, read again from the input (x + m_S rounded in the accumulation dtype is not
// a unit vector to the last bit: a student of one channel, whose gradient is 0, got rounding
// times the large w). Times grad[b] * scale, into each window's argmax of out [k, Cs, H, W]
// (contiguous), zeros at the window's other elements: every element of out is written.
// grid (ceil(P / kPixels), k).
//
// kAhead: channels whose whole 2 x 2 windows (and w's reads of g1, g2 and x; of g1 and x where
// kAhead > 1) a thread loads before using any, in both walks; the adds keep channel order, so
// the same bits as with one. With one (the
// default) a thread has one window in flight: the H200 took 0.16 ms a launch (2 launches, 0.33 ms
// of SKD's 3.2 ms forward+backward at pool 2), about 1.1 TB/s for the 184 MB of DRAM traffic a
// chunk of 4 images needs (one read of the student, g1, g2 and x, one write of the gradient; the
// second walk reads a block's 64 KB of windows and its rows of g1, g2 and x again, from L2 while
// about 400 blocks' 26 MB are resident). IDD_OPS_CUDA_NEXT=1 takes
// kGradientAhead (no GPU has run it yet); windows cut by the border, and other pools, walk as the
// default does. Three: 114 registers a thread on sm_90 (float; ptxas; 116 when it read g2), so 2
// blocks an SM with 21 loads a thread in flight, where the default's 80 registers fit 3 blocks
// with 7; four took 134 registers (1 block), and capped at 3 blocks an SM even two spilled.
constexpr int kGradientAhead = 3;

template <typename scalar_t, int kAhead>
__global__ void affinity_gradient_kernel(const at::opmath_type<scalar_t>* __restrict__ g1,
                                         const at::opmath_type<scalar_t>* __restrict__ g2,
                                         const gemm_operand_t<scalar_t>* __restrict__ us, int64_t us_image,
                                         const double* __restrict__ norms, const double* __restrict__ u_vec,
                                         const double* __restrict__ m_s, const double* __restrict__ alpha_parts,
                                         int64_t alpha_tiles, const double* __restrict__ beta,
                                         const at::opmath_type<scalar_t>* __restrict__ grad, int64_t grad_stride,
                                         double scale, const scalar_t* __restrict__ student, PoolView vs, int64_t Cs,
                                         int64_t P, scalar_t* __restrict__ out) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ acc_t part[kGroups][kPixels];
  const int64_t b = blockIdx.y, p = static_cast<int64_t>(blockIdx.x) * kPixels + threadIdx.x;
  const bool live = p < P;
  const acc_t* ga = g1 + b * Cs * P + p;
  const acc_t* gb = kAhead > 1 ? nullptr : g2 + b * Cs * P + p;
  // x's rows: OperandRows' offset in the next set, the default's Cs * P as the H200 ran it
  const gemm_operand_t<scalar_t>* xp = us + b * (kAhead > 1 ? us_image : Cs * P) + p;
  const double* ub = u_vec + b * Cs;
  const double* ms = m_s + b * Cs;
  const double eps = kAffinityNormEps, norm = live ? norms[b * P + p] : 1.0;
  const bool floored = !(norm > eps);
  const double norm_c = norm < eps ? eps : norm;
  const double alpha = floored ? 0.0 : alpha_of(alpha_parts + b * alpha_tiles, alpha_tiles);
  const acc_t rho = live ? static_cast<acc_t>(static_cast<double>(P) * (beta[b * P + p] + alpha)) : acc_t(0);
  const auto w_of = [&](int64_t c) {
    const acc_t g = kAhead > 1 ? ga[c * P] : ga[c * P] + gb[c * P];
    return floored ? g + rho * static_cast<acc_t>(ms[c])
                   : g + static_cast<acc_t>(ub[c]) - rho * static_cast<acc_t>(xp[c * P]);
  };
  const Window win = window_of(vs, live ? p : 0);
  // a constant false for the default (kAhead 1), whose walks below are the ones the H200 ran
  const bool ahead = kAhead > 1 && vs.pool == 2 && win.y1 - win.y0 == 2 && win.x1 - win.x0 == 2;
  Quad<acc_t> q[kAhead] = {};
  acc_t wv[kAhead] = {};
  const auto load_step = [&](int64_t c0) {  // every load of a step, before any use
#pragma unroll
    for (int j = 0; j < kAhead; ++j) {
      const int64_t c = c0 + j * kGroups;
      if (c < Cs) {
        q[j] = load_quad<scalar_t, acc_t>(student, vs, b, c, win);
        wv[j] = w_of(c);
      }
    }
  };
  acc_t along = 0;
  if (live && !floored) {
    if (ahead) {
      for (int64_t c0 = threadIdx.y; c0 < Cs; c0 += kAhead * kGroups) {
        load_step(c0);
#pragma unroll
        for (int j = 0; j < kAhead; ++j)
          if (c0 + j * kGroups < Cs) along += static_cast<acc_t>(quad_max(q[j]) / norm_c) * wv[j];
      }
    } else {
      for (int64_t c = threadIdx.y; c < Cs; c += kGroups)
        along += static_cast<acc_t>(window_max<scalar_t, acc_t>(student, vs, b, c, win) / norm_c) * w_of(c);
    }
  }
  along = groups_sum(along, part);
  if (!live) return;
  const acc_t factor = static_cast<acc_t>(grad[b * grad_stride] * scale / norm_c);
  const int64_t HW = vs.H * vs.W;
  if (ahead) {
    for (int64_t c0 = threadIdx.y; c0 < Cs; c0 += kAhead * kGroups) {
      load_step(c0);
#pragma unroll
      for (int j = 0; j < kAhead; ++j) {
        const int64_t c = c0 + j * kGroups;
        if (c >= Cs) break;
        acc_t best;
        const int at = quad_argmax(q[j], &best);
        const acc_t s = static_cast<acc_t>(best / norm_c);
        const scalar_t value = static_cast<scalar_t>((wv[j] - (floored ? acc_t(0) : s * along)) * factor);
        // the four values first, then four stores that every lane makes (a store per value
        // would split a warp's store by where each window's maximum is)
        const scalar_t zero(0);
        const scalar_t v0 = at == 0 ? value : zero, v1 = at == 1 ? value : zero;
        const scalar_t v2 = at == 2 ? value : zero, v3 = at == 3 ? value : zero;
        scalar_t* cell = out + (b * Cs + c) * HW + win.y0 * vs.W + win.x0;
        cell[0] = v0;
        cell[1] = v1;
        cell[vs.W] = v2;
        cell[vs.W + 1] = v3;
      }
    }
    return;
  }
  for (int64_t c = threadIdx.y; c < Cs; c += kGroups) {
    int64_t argmax;
    const acc_t s = static_cast<acc_t>(window_max<scalar_t, acc_t>(student, vs, b, c, win, &argmax) / norm_c);
    const scalar_t value = static_cast<scalar_t>((w_of(c) - (floored ? acc_t(0) : s * along)) * factor);
    scalar_t* plane = out + (b * Cs + c) * HW;
    for (int64_t y = win.y0; y < win.y1; ++y)
      for (int64_t x = win.x0; x < win.x1; ++x) plane[y * vs.W + x] = y * vs.W + x == argmax ? value : scalar_t(0);
  }
}

}  // namespace affinity_cuda
}  // namespace idd_ops
