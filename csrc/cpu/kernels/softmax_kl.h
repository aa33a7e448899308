#pragma once
// Loops of the CPU softmax-KL kernels (exp-bound), compiled per CPU capability in softmax_kl.cpp.
// Element c of strided vector v is at c * stride + v; a contiguous vector has stride 1.
#include <ATen/OpMathType.h>

#include <cstdint>

#include "../../common/softmax_kl.h"
#include "../dispatch.h"

namespace idd_ops {

// Vectors handled together when they are strided (one per inner index): the loops over a
// tile run along contiguous memory and vectorise.
constexpr int64_t kSoftmaxKLTile = 2048;

// Per-vector statistics: maxima of s and t, then the sums of SoftmaxKLSums.
template <typename acc_t>
struct SoftmaxKLStats {
  acc_t ms, mt, zs, zt, w;
};

// The split log-sum-exps of a tile of vectors, student (s) and teacher (t).
template <typename acc_t>
struct SplitLseRows {
  acc_t s_hi[kSoftmaxKLTile], s_lo[kSoftmaxKLTile], t_hi[kSoftmaxKLTile], t_lo[kSoftmaxKLTile];

  void set(int64_t v, double lse_s, double lse_t) {
    const SplitLse<acc_t> a = split_lse<acc_t>(lse_s), b = split_lse<acc_t>(lse_t);
    s_hi[v] = a.hi, s_lo[v] = a.lo, t_hi[v] = b.hi, t_lo[v] = b.lo;
  }
};

template <typename scalar_t, typename acc_t = at::opmath_type<scalar_t>>
struct SoftmaxKLLoops {
  // Statistics of n <= kSoftmaxKLTile strided vectors starting at s/t.
  void (*strided_stats)(const scalar_t* s, const scalar_t* t, int64_t length, int64_t stride, int64_t n, acc_t inv_T,
                        SoftmaxKLStats<acc_t>* out);
  // Statistics of one contiguous vector.
  SoftmaxKLStats<acc_t> (*contiguous_stats)(const scalar_t* s, const scalar_t* t, int64_t length, acc_t inv_T);
  // out = g[v] * (exp(s / T - lse_s[v]) - exp(t / T - lse_t[v])) for n strided vectors (g holds
  // grad / T; each lse as common/softmax_kl.h's split_lse pair, hi and lo in arrays of their own
  // so that the loop over v vectorises).
  void (*strided_grad)(const scalar_t* s, const scalar_t* t, scalar_t* out, int64_t length, int64_t stride, int64_t n,
                       const acc_t* g, const SplitLseRows<acc_t>& lse, acc_t inv_T);
};

IDD_DECLARE_CPU_KERNEL(template <typename scalar_t> SoftmaxKLLoops<scalar_t> softmax_kl_loops())

}  // namespace idd_ops
