// KL between temperature softmaxes of a teacher and a student along the middle dim of
// [outer, length, inner] tensors, forward and backward, on the CPU. Pixel KD reduces over
// classes ([B, K, H*W]: vectors strided by H*W), CWD over pixels ([B*C, H*W, 1]: contiguous).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "../common/checks.h"
#include "../common/softmax_kl.h"
#include "kernels/softmax_kl.h"

namespace idd_ops {
namespace {

constexpr int64_t kTile = kSoftmaxKLTile;

template <typename acc_t>
using Stats = SoftmaxKLStats<acc_t>;

// Calls body(o, i0, n, stats) for every group of vectors: one contiguous vector per call
// when inner == 1, else a tile of up to kTile strided vectors starting at inner index i0.
template <typename scalar_t, typename acc_t, typename F>
void for_each_group(const scalar_t* s, const scalar_t* t, int64_t outer, int64_t length, int64_t inner, acc_t inv_T,
                    F body) {
  const SoftmaxKLLoops<scalar_t> loops = IDD_CPU_KERNEL(softmax_kl_loops<scalar_t>)();
  if (inner == 1) {
    at::parallel_for(0, outer, 1, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const Stats<acc_t> st = loops.contiguous_stats(s + o * length, t + o * length, length, inv_T);
        body(o, 0, 1, &st);
      }
    });
    return;
  }
  const int64_t tiles = (inner + kTile - 1) / kTile;
  at::parallel_for(0, outer * tiles, 1, [&](int64_t g0, int64_t g1) {
    Stats<acc_t> st[kTile];
    for (int64_t g = g0; g < g1; ++g) {
      // (o, tile) is one group of vectors
      const int64_t o = g / tiles, i0 = (g % tiles) * kTile, n = std::min(kTile, inner - i0);
      const int64_t base = o * length * inner + i0;
      loops.strided_stats(s + base, t + base, length, inner, n, inv_T, st);
      body(o, i0, n, st);
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> softmax_kl_kernel(const at::Tensor& student, const at::Tensor& teacher,
                                                                double temperature) {
  check_softmax_kl_inputs(student, teacher, temperature);
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto acc = acc_dtype(s.scalar_type());
  at::Tensor kl = at::zeros({outer, inner}, s.options().dtype(acc));
  at::Tensor lse_s = at::zeros({outer, inner}, s.options().dtype(at::kDouble)), lse_t = at::zeros_like(lse_s);
  if (s.numel() == 0) return {kl, lse_s, lse_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t* out = kl.data_ptr<acc_t>();
    double *ls = lse_s.data_ptr<double>(), *lt = lse_t.data_ptr<double>();
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    for_each_group<scalar_t, acc_t>(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), outer, length, inner,
                                    inv_T, [&](int64_t o, int64_t i0, int64_t n, const Stats<acc_t>* st) {
      for (int64_t v = 0; v < n; ++v) {
        const auto r = softmax_kl_vector(st[v].ms, st[v].mt, st[v].zs, st[v].zt, st[v].w, inv_T);
        const int64_t k = o * inner + i0 + v;
        out[k] = r.kl, ls[k] = r.lse_s, lt[k] = r.lse_t;
      }
    });
  });
  return {kl, lse_s, lse_t};
}

// grad_s[o, c, i] = grad[o, i] * (softmax(s / T) - softmax(t / T))[c] / T, one pass with the
// forward's log-sum-exps (two doubles per vector are cheaper to keep than two passes to redo).
at::Tensor softmax_kl_backward_kernel(const at::Tensor& grad_in, const at::Tensor& student, const at::Tensor& teacher,
                                     const at::Tensor& lse_student, const at::Tensor& lse_teacher, double temperature) {
  check_softmax_kl_backward_inputs(grad_in, student, teacher, lse_student, lse_teacher, temperature);
  const at::Tensor s = student.contiguous(), t = teacher.to(student.scalar_type()).contiguous();
  const int64_t outer = s.size(0), length = s.size(1), inner = s.size(2);
  const auto acc = acc_dtype(s.scalar_type());
  const at::Tensor grad = grad_in.to(acc).contiguous();
  const at::Tensor ls = lse_student.contiguous(), lt = lse_teacher.contiguous();
  at::Tensor out = at::empty_like(s);
  if (s.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* sp = s.const_data_ptr<scalar_t>();
    const scalar_t* tp = t.const_data_ptr<scalar_t>();
    const acc_t* g = grad.const_data_ptr<acc_t>();
    const double *lsp = ls.const_data_ptr<double>(), *ltp = lt.const_data_ptr<double>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    const SoftmaxKLLoops<scalar_t> loops = IDD_CPU_KERNEL(softmax_kl_loops<scalar_t>)();
    const int64_t tile = inner == 1 ? 1 : kTile, tiles = (inner + tile - 1) / tile;
    at::parallel_for(0, outer * tiles, 1, [&](int64_t g0, int64_t g1) {
      acc_t gv[kTile];
      SplitLseRows<acc_t> lse;
      for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t o = grp / tiles, i0 = (grp % tiles) * tile, n = std::min(tile, inner - i0);
        for (int64_t v = 0; v < n; ++v) {
          const int64_t k = o * inner + i0 + v;
          gv[v] = g[k] * inv_T;
          lse.set(v, lsp[k], ltp[k]);
        }
        const int64_t base = o * length * inner + i0;
        loops.strided_grad(sp + base, tp + base, op + base, length, inner, n, gv, lse, inv_T);
      }
    });
  });
  return out;
}

}  // namespace

// CPU implementations of the schemas declared in idd_ops.cpp.
TORCH_LIBRARY_IMPL(idd_ops, CPU, m) {
  m.impl("softmax_kl", &softmax_kl_kernel);
  m.impl("_softmax_kl_backward", &softmax_kl_backward_kernel);
}

}  // namespace idd_ops
