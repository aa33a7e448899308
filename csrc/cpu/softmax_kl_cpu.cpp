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

namespace idd_ops {
namespace {

// Vectors handled together when they are strided (one per inner index): the loops over a
// tile run along contiguous memory and vectorise.
constexpr int64_t kTile = 2048;
// Independent partial sums along a contiguous vector.
constexpr int64_t kParts = 8;

// Per-vector statistics: maxima of s and t, then the sums of SoftmaxKLSums.
template <typename acc_t>
struct Stats {
  acc_t ms, mt, zs, zt, w;
};

// Statistics of `n` strided vectors starting at s/t (element c of vector v at c*stride + v).
template <typename scalar_t, typename acc_t>
void strided_stats(const scalar_t* s, const scalar_t* t, int64_t length, int64_t stride, int64_t n, acc_t inv_T,
                   Stats<acc_t>* out) {
  acc_t ms[kTile], mt[kTile], zs[kTile], zt[kTile], w[kTile];
  std::fill(ms, ms + n, -std::numeric_limits<acc_t>::infinity());
  std::fill(mt, mt + n, -std::numeric_limits<acc_t>::infinity());
  for (int64_t c = 0; c < length; ++c)
    for (int64_t v = 0; v < n; ++v) {
      ms[v] = std::max(ms[v], static_cast<acc_t>(s[c * stride + v]));
      mt[v] = std::max(mt[v], static_cast<acc_t>(t[c * stride + v]));
    }
  std::fill(zs, zs + n, acc_t(0));
  std::fill(zt, zt + n, acc_t(0));
  std::fill(w, w + n, acc_t(0));
  for (int64_t c = 0; c < length; ++c)
    for (int64_t v = 0; v < n; ++v) {
      const acc_t a = (static_cast<acc_t>(t[c * stride + v]) - mt[v]) * inv_T;
      const acc_t b = (static_cast<acc_t>(s[c * stride + v]) - ms[v]) * inv_T;
      const acc_t ea = vec_exp(a);
      zt[v] += ea;
      zs[v] += vec_exp(b);
      w[v] += kl_term(ea, a, b);
    }
  for (int64_t v = 0; v < n; ++v) out[v] = {ms[v], mt[v], zs[v], zt[v], w[v]};
}

// Statistics of one contiguous vector, with kParts partial results per quantity.
template <typename scalar_t, typename acc_t>
Stats<acc_t> contiguous_stats(const scalar_t* s, const scalar_t* t, int64_t length, acc_t inv_T) {
  acc_t ms[kParts], mt[kParts], zs[kParts] = {}, zt[kParts] = {}, w[kParts] = {};
  std::fill(ms, ms + kParts, -std::numeric_limits<acc_t>::infinity());
  std::fill(mt, mt + kParts, -std::numeric_limits<acc_t>::infinity());
  const int64_t body = length / kParts * kParts;
  for (int64_t c = 0; c < body; c += kParts)
    for (int64_t u = 0; u < kParts; ++u) {
      ms[u] = std::max(ms[u], static_cast<acc_t>(s[c + u]));
      mt[u] = std::max(mt[u], static_cast<acc_t>(t[c + u]));
    }
  for (int64_t c = body; c < length; ++c) {
    ms[0] = std::max(ms[0], static_cast<acc_t>(s[c]));
    mt[0] = std::max(mt[0], static_cast<acc_t>(t[c]));
  }
  const acc_t Ms = *std::max_element(ms, ms + kParts), Mt = *std::max_element(mt, mt + kParts);
  for (int64_t c = 0; c < body; c += kParts)
    for (int64_t u = 0; u < kParts; ++u) {
      const acc_t a = (static_cast<acc_t>(t[c + u]) - Mt) * inv_T;
      const acc_t b = (static_cast<acc_t>(s[c + u]) - Ms) * inv_T;
      const acc_t ea = vec_exp(a);
      zt[u] += ea;
      zs[u] += vec_exp(b);
      w[u] += kl_term(ea, a, b);
    }
  for (int64_t c = body; c < length; ++c) {
    const acc_t a = (static_cast<acc_t>(t[c]) - Mt) * inv_T, b = (static_cast<acc_t>(s[c]) - Ms) * inv_T;
    const acc_t ea = vec_exp(a);
    zt[0] += ea;
    zs[0] += vec_exp(b);
    w[0] += kl_term(ea, a, b);
  }
  Stats<acc_t> r{Ms, Mt, 0, 0, 0};
  for (int64_t u = 0; u < kParts; ++u) r.zs += zs[u], r.zt += zt[u], r.w += w[u];
  return r;
}

// grad of n strided vectors (element c of vector v at c*stride + v; n == 1: one vector with
// stride 1 when inner == 1): g[v] / T * (exp(s/T - lse_s[v]) - exp(t/T - lse_t[v])).
template <typename scalar_t, typename acc_t>
void strided_grad(const scalar_t* s, const scalar_t* t, scalar_t* out, int64_t length, int64_t stride, int64_t n,
                  const acc_t* g, const acc_t* lse_s, const acc_t* lse_t, acc_t inv_T) {
  if (n == 1) {  // one vector: vectorise along it
    const acc_t g0 = g[0], ls = lse_s[0], lt = lse_t[0];
    for (int64_t c = 0; c < length; ++c) {
      const acc_t ps = vec_exp(static_cast<acc_t>(s[c * stride]) * inv_T - ls);
      const acc_t pt = vec_exp(static_cast<acc_t>(t[c * stride]) * inv_T - lt);
      out[c * stride] = static_cast<scalar_t>(g0 * (ps - pt));
    }
    return;
  }
  for (int64_t c = 0; c < length; ++c) {
    const scalar_t* sc = s + c * stride;
    const scalar_t* tc = t + c * stride;
    scalar_t* oc = out + c * stride;
    for (int64_t v = 0; v < n; ++v) {
      const acc_t ps = vec_exp(static_cast<acc_t>(sc[v]) * inv_T - lse_s[v]);
      const acc_t pt = vec_exp(static_cast<acc_t>(tc[v]) * inv_T - lse_t[v]);
      oc[v] = static_cast<scalar_t>(g[v] * (ps - pt));
    }
  }
}

// Calls body(o, i0, n, stats) for every group of vectors: one contiguous vector per call
// when inner == 1, else a tile of up to kTile strided vectors starting at inner index i0.
template <typename scalar_t, typename acc_t, typename F>
void for_each_group(const scalar_t* s, const scalar_t* t, int64_t outer, int64_t length, int64_t inner, acc_t inv_T,
                    F body) {
  if (inner == 1) {
    at::parallel_for(0, outer, 1, [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        const Stats<acc_t> st = contiguous_stats<scalar_t, acc_t>(s + o * length, t + o * length, length, inv_T);
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
      strided_stats<scalar_t, acc_t>(s + base, t + base, length, inner, n, inv_T, st);
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
  at::Tensor lse_s = at::zeros({outer, inner}, s.options().dtype(acc)), lse_t = at::zeros_like(lse_s);
  if (s.numel() == 0) return {kl, lse_s, lse_t};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "softmax_kl_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    acc_t *out = kl.data_ptr<acc_t>(), *ls = lse_s.data_ptr<acc_t>(), *lt = lse_t.data_ptr<acc_t>();
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    for_each_group<scalar_t, acc_t>(s.const_data_ptr<scalar_t>(), t.const_data_ptr<scalar_t>(), outer, length, inner,
                                    inv_T, [&](int64_t o, int64_t i0, int64_t n, const Stats<acc_t>* st) {
      for (int64_t v = 0; v < n; ++v) {
        SoftmaxKLSums<acc_t> sums;
        sums.zt = st[v].zt, sums.zs = st[v].zs, sums.w = st[v].w;
        out[o * inner + i0 + v] = sums.kl();
        ls[o * inner + i0 + v] = st[v].ms * inv_T + std::log(st[v].zs);
        lt[o * inner + i0 + v] = st[v].mt * inv_T + std::log(st[v].zt);
      }
    });
  });
  return {kl, lse_s, lse_t};
}

// grad_s[o, c, i] = grad[o, i] * (softmax(s / T) - softmax(t / T))[c] / T, one pass with the
// forward's log-sum-exps (4 numbers per vector are cheaper to keep than two passes to redo).
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
    const acc_t *g = grad.const_data_ptr<acc_t>(), *lsp = ls.const_data_ptr<acc_t>(), *ltp = lt.const_data_ptr<acc_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const acc_t inv_T = static_cast<acc_t>(1.0 / temperature);
    const int64_t tile = inner == 1 ? 1 : kTile, tiles = (inner + tile - 1) / tile;
    at::parallel_for(0, outer * tiles, 1, [&](int64_t g0, int64_t g1) {
      acc_t gv[kTile], a[kTile], b[kTile];
      for (int64_t grp = g0; grp < g1; ++grp) {
        const int64_t o = grp / tiles, i0 = (grp % tiles) * tile, n = std::min(tile, inner - i0);
        for (int64_t v = 0; v < n; ++v) {
          const int64_t k = o * inner + i0 + v;
          gv[v] = g[k] * inv_T, a[v] = lsp[k], b[v] = ltp[k];
        }
        const int64_t base = o * length * inner + i0;
        strided_grad<scalar_t, acc_t>(sp + base, tp + base, op + base, length, inner, n, gv, a, b, inv_T);
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
