// Structural (pairwise-affinity) KD loss through C x C Gram products, forward and backward,
// with the pooling and the L2 normalisation fused in. Device-generic: per block of pooled
// pixels it is a few ATen calls and GEMMs, so one implementation serves CPU and CUDA
// (CompositeExplicitAutograd) and the P x P affinity is never formed.
//
// With F_S [Cs, P] and F_T [Ct, P] the pooled, L2-normalised (over channels) features of one
// image and A = F^T F:
//   sum (A_S - A_T)^2 = ||F_S F_S^T||^2 - 2 ||F_S F_T^T||^2 + ||F_T F_T^T||^2   (Frobenius)
//   d/dF_S = 4 (F_S F_S^T F_S - F_S F_T^T F_T)
// The Grams are sums over pixels, so they are accumulated over blocks of pooled pixels
// (kBlockValues): the pooled and normalised copies exist one block at a time (O(kBlockValues)),
// never for the whole batch, and the backward recomputes them per block from the inputs and
// routes the gradient straight into the input-sized result. Extra memory beyond that result:
// the two [B, Cs, C] Grams kept for the backward and a few [C, C] and block-sized temporaries.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>

#include "../common/checks.h"

namespace idd_ops {
namespace {

// Values (channels x pooled pixels, rounded to whole pooled rows) per block: each block's
// copies stay at 1 MiB in float32, while a block is large enough that its GEMMs run
// efficiently and that the ATen calls per block (each a parallel region) stay few.
constexpr int64_t kBlockValues = int64_t{1} << 18;
// F.normalize's floor of the norm.
constexpr double kNormEps = 1e-12;

// The pooled map of one image and its blocks of pooled rows.
struct PoolGeometry {
  int64_t H, W, pool, Ho, Wo, rows_per_block;
  PoolGeometry(int64_t channels, int64_t height, int64_t width, int64_t p)
      : H(height), W(width), pool(p), Ho((height + p - 1) / p), Wo((width + p - 1) / p),
        rows_per_block(std::max<int64_t>(1, kBlockValues / std::max<int64_t>(channels * Wo, 1))) {}
  int64_t pixels() const { return Ho * Wo; }
  // input rows [in0, in1) of the pooled rows [o0, o0 + rows_per_block)
  int64_t in0(int64_t o0) const { return o0 * pool; }
  int64_t in1(int64_t o0) const { return std::min(H, (o0 + rows_per_block) * pool); }
};

// One block of one image's pooled (pool x pool max, ceil mode), normalised features.
struct PooledBlock {
  at::Tensor u;        // [C, p] normalised features in `dtype`
  at::Tensor norm;     // [1, p] their norms before normalisation
  at::Tensor indices;  // [C, p] argmax of each window, flat in the block's input rows (pool > 1)
};

PooledBlock pooled_block(const at::Tensor& x, const PoolGeometry& g, int64_t o0, at::ScalarType dtype,
                         bool with_indices) {
  // [1, C, rows, W]: ATen's CPU max pooling runs a batch of one image about 1.7x faster than
  // the same image without a batch dimension
  const at::Tensor rows = x.narrow(1, g.in0(o0), g.in1(o0) - g.in0(o0)).unsqueeze(0);
  PooledBlock out;
  at::Tensor y;
  if (g.pool == 1) {
    y = rows.reshape({x.size(0), -1});
  } else if (with_indices) {
    auto [v, i] = at::max_pool2d_with_indices(rows, {g.pool, g.pool}, {g.pool, g.pool}, {0, 0}, {1, 1}, true);
    y = v.flatten(2)[0];
    out.indices = i.flatten(2)[0];
  } else {
    y = at::max_pool2d(rows, {g.pool, g.pool}, {g.pool, g.pool}, {0, 0}, {1, 1}, true).flatten(2)[0];
  }
  y = y.to(dtype);
  out.norm = y.norm(2, {0}, /*keepdim=*/true);
  out.u = y / out.norm.clamp_min(kNormEps);
  return out;
}

double mean_divisor(const PoolGeometry& g) {
  const double P = static_cast<double>(g.pixels());
  return std::max(P * P, 1.0);
}

// Returns (per-image loss [B], G_ss, G_st): entry b is the mean over the P*P affinity entries of
// image b, in the accumulation dtype; the two Gram products are what the backward needs.
//
// Equal channel counts take the differenced form: with D = F_S - F_T, A_S - A_T = F_S^T D + D^T F_T
// and sum (A_S - A_T)^2 = <G_ss, G_dd> + <G_dd, G_tt> + 2 <G_sd, G_td^T> (G_xy = X Y^T). Every term
// carries a Gram of D, so the value keeps its relative accuracy however close the student is to
// the teacher; G_td = G_sd - G_dd, G_tt = G_ss - G_sd - G_sd^T + G_dd and G_st = G_ss - G_sd follow
// without further products. Different channel counts have no D: the three Gram norms cancel as
// the student nears the teacher, so those Grams are accumulated in float64.
std::tuple<at::Tensor, at::Tensor, at::Tensor> affinity_loss(const at::Tensor& student, const at::Tensor& teacher,
                                                             int64_t pool) {
  check_affinity_loss_inputs(student, teacher, pool);
  const auto acc = acc_dtype(student.scalar_type());
  const int64_t B = student.size(0), Cs = student.size(1), Ct = teacher.size(1);
  const bool same = Cs == Ct;
  const auto gram_dtype = same ? acc : at::kDouble;
  const auto opts = student.options().dtype(gram_dtype);
  const PoolGeometry g(std::max(Cs, Ct), student.size(2), student.size(3), pool);
  at::Tensor gss = at::empty({B, Cs, Cs}, opts), gst = at::empty({B, Cs, Ct}, opts), sums = at::empty({B}, opts.dtype(at::kDouble));
  const auto dot = [](const at::Tensor& a, const at::Tensor& b) { return (a * b).to(at::kDouble).sum(); };
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor g_ss = gss[b], g_sx = gst[b];  // G_sd (equal channels) or G_st, made G_st at the end
    at::Tensor g_xx = at::zeros({Ct, Ct}, opts);  // G_dd or G_tt
    g_ss.zero_();
    g_sx.zero_();
    for (int64_t o0 = 0; o0 < g.Ho; o0 += g.rows_per_block) {
      const at::Tensor us = pooled_block(student[b], g, o0, gram_dtype, false).u;
      const at::Tensor ut = pooled_block(teacher[b], g, o0, gram_dtype, false).u;
      const at::Tensor x = same ? us - ut : ut;
      g_ss.addmm_(us, us.t());
      g_sx.addmm_(us, x.t());
      g_xx.addmm_(x, x.t());
    }
    if (same) {
      const at::Tensor gtd = g_sx - g_xx;
      const at::Tensor gtt = g_ss - g_sx - g_sx.t() + g_xx;
      sums[b].copy_(dot(g_ss, g_xx) + dot(g_xx, gtt) + 2 * dot(g_sx, gtd.t()));
      g_sx.copy_(g_ss - g_sx);
    } else {
      sums[b].copy_(g_ss.square().sum() - 2 * g_sx.square().sum() + g_xx.square().sum());
    }
  }
  // A sum of squares is >= 0; the clamp only removes rounding at 0.
  return {(sums.clamp_min(0) / mean_divisor(g)).to(acc), gss.to(acc), gst.to(acc)};
}

// grad [B] (one value per image's loss) -> d/d student [B, Cs, H, W]: per block, the gradient
// w.r.t. the normalised features 4 s_b (G_ss F_S - G_st F_T), through the normalisation
// ((g - u <u, g>) / |f|, or g / eps where the norm is floored), into each window's argmax.
at::Tensor affinity_loss_backward(const at::Tensor& grad, const at::Tensor& student, const at::Tensor& teacher,
                                  const at::Tensor& gss, const at::Tensor& gst, int64_t pool) {
  check_affinity_loss_backward_inputs(grad, student, teacher, gss, gst, pool);
  const auto acc = gss.scalar_type();
  const int64_t B = student.size(0), Cs = student.size(1), H = student.size(2), W = student.size(3);
  const PoolGeometry g(std::max(Cs, teacher.size(1)), H, W, pool);
  const at::Tensor scale = grad.to(acc) * (4.0 / mean_divisor(g));
  at::Tensor out = at::zeros({B, Cs, H, W}, student.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t b = 0; b < B; ++b) {
    at::Tensor out_b = out[b].view({Cs, H * W});
    for (int64_t o0 = 0; o0 < g.Ho; o0 += g.rows_per_block) {
      const PooledBlock s = pooled_block(student[b], g, o0, acc, true);
      const at::Tensor ut = pooled_block(teacher[b], g, o0, acc, false).u;
      at::Tensor gu = at::mm(gss[b], s.u);
      gu.addmm_(gst[b], ut, 1, -1).mul_(scale[b]);
      const at::Tensor gy = at::where(s.norm > kNormEps, (gu - s.u * (s.u * gu).sum(0, /*keepdim=*/true)) / s.norm,
                                      gu / kNormEps)
                                .to(student.scalar_type());
      const int64_t first = g.in0(o0) * W;
      if (pool == 1) {
        out_b.narrow(1, first, gy.size(1)).copy_(gy);
      } else {
        out_b.scatter_(1, s.indices + first, gy);
      }
    }
  }
  return out;
}

}  // namespace

// One implementation for every device: it is built from ATen calls and GEMMs.
TORCH_LIBRARY_IMPL(idd_ops, CompositeExplicitAutograd, m) {
  m.impl("affinity_loss", &affinity_loss);
  m.impl("_affinity_loss_backward", &affinity_loss_backward);
}

}  // namespace idd_ops
